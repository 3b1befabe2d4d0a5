"""Draw the MedSegUNet panel from its .ui file, as a PNG, without Slicer.

    .venv/bin/pip install PySide6-Essentials   # once: a drawing tool, not a dependency of the project
    .venv/bin/python tools/draw_panel.py       # -> Resources/Screenshots/panel.png

The layout is the real MedSegUNet/Resources/UI/MedSegUNet.ui, loaded with Qt's QUiLoader on the offscreen
platform, so the picture cannot drift from it. Slicer's and CTK's widgets become plain-Qt stand-ins:
ctkCollapsibleButton a header button over a frame (the main sections drawn expanded, a nested one such as
Advanced as the .ui has it: collapsed), qMRMLNodeComboBox a QComboBox, ctkSliderWidget a QSlider beside a
QDoubleSpinBox, any other Slicer widget its Qt base class from the API snapshot's ui_custom_widgets.
The model line and its details are MedSegUNet.py's own text for the shipped model (its describeModel and
helpers, run here outside Slicer); the rest are plausible values of a panel after one Segment run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "MedSegUNet" / "Resources" / "UI" / "MedSegUNet.ui"
MODULE_FILE = REPO / "MedSegUNet" / "MedSegUNet.py"
API_FILE = REPO / "Testing" / "data" / "slicer-api" / "slicer_api_v5.12.3.json"
MODEL = REPO / "Resources" / "Models" / "abdomen-ct.safetensors"
OUTPUT = REPO / "Resources" / "Screenshots" / "panel.png"
WIDTH = 480  # about a Slicer module panel's width

try:
    from PySide6 import QtCore, QtGui, QtWidgets
    from PySide6.QtUiTools import QUiLoader
except ImportError:
    raise SystemExit("PySide6 is missing: .venv/bin/pip install PySide6-Essentials") from None


# --- MedSegUNet.py's own text -------------------------------------------------------------------------


def module_text_functions() -> dict:
    """MedSegUNet.py's plain functions and constants and MedSegUNetLogic.describeModel, run outside Slicer
    (the module imports slicer and qt at the top, so it cannot be imported here)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    body: List[ast.stmt] = []
    slicer_only = {"qt", "ctk", "vtk", "slicer", "MedSegUNetLib", "MedSegUNetMRML"}  # what the helpers do without
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in slicer_only:
            body.append(node)
        elif isinstance(node, ast.Import) and not {a.name.split(".")[0] for a in node.names} & slicer_only:
            body.append(node)
        elif isinstance(node, ast.FunctionDef):
            body.append(node)
        elif isinstance(node, ast.Assign):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            body.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == "MedSegUNetLogic":
            describe = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "describeModel")
            describe.decorator_list = []  # a staticmethod: a plain function here
            body.append(describe)
    namespace: dict = {"_": lambda text: text}  # Slicer's tr(), untranslated
    sys.path.insert(0, str(REPO / "MedSegUNet"))  # describeModel imports MedSegUNetLib
    exec(compile(ast.Module(body=body, type_ignores=[]), str(MODULE_FILE), "exec"), namespace)
    return namespace


# --- the .ui with plain-Qt stand-ins --------------------------------------------------------------------


def qt_base(cls: str, custom: Dict[str, dict]) -> str:
    """The first QtWidgets class up a Slicer widget's chain of bases (ctkCheckablePushButton -> QPushButton)."""
    seen = set()
    while not hasattr(QtWidgets, cls):
        if cls in seen or cls not in custom:
            raise SystemExit(f"{cls}: not a Qt widget and not in {API_FILE.name}'s ui_custom_widgets")
        seen.add(cls)
        cls = custom[cls]["extends"]
    return cls


def keep_qt_properties(widget: ElementTree.Element, cls: str) -> Dict[str, ElementTree.Element]:
    """Drop the properties the Qt class lacks (Slicer's own); return them by name. Dynamic ones stay."""
    meta = getattr(QtWidgets, cls).staticMetaObject
    dropped = {}
    for prop in widget.findall("property"):
        if prop.get("stdset") != "0" and meta.indexOfProperty(prop.get("name")) < 0:
            dropped[prop.get("name")] = prop
            widget.remove(prop)
    return dropped


def value_of(prop: ElementTree.Element):
    value = prop[0]
    if value.tag in ("double", "number"):
        return float(value.text)
    if value.tag == "bool":
        return value.text == "true"
    return value.text


def element(tag: str, text: Optional[str] = None, **attributes) -> ElementTree.Element:
    made = ElementTree.Element(tag, attributes)
    made.text = text
    return made


def string_property(name: str, text: str) -> ElementTree.Element:
    prop = element("property", name=name)
    prop.append(element("string", text))
    return prop


def margins_zero(layout: ElementTree.Element) -> None:
    for side in ("leftMargin", "topMargin", "rightMargin", "bottomMargin", "spacing"):
        prop = element("property", name=side)
        prop.append(element("number", "0"))
        layout.append(prop)


def stand_ins(root: ElementTree.Element, custom: Dict[str, dict]) -> Dict[str, dict]:
    """Rewrite the .ui's Slicer widgets as Qt ones, in place; returns what the drawing needs of each."""
    found: Dict[str, dict] = {}
    top = root.find("widget")
    main_items = {id(w) for w in top.find("layout").findall("item/widget")}
    replaced = set()
    for widget in list(root.iter("widget")):
        cls, name = widget.get("class"), widget.get("name")
        if hasattr(QtWidgets, cls):
            continue
        replaced.add(name)
        if cls == "ctkCollapsibleButton":
            dropped = keep_qt_properties(widget, "QWidget")
            title = dropped.get("text")
            collapsed = bool(value_of(dropped["collapsed"])) if "collapsed" in dropped else False
            found[name] = {
                "kind": "collapsible",
                "collapsed": collapsed and id(widget) not in main_items,  # the main sections drawn expanded
            }
            contents = widget.find("layout")
            widget.remove(contents)
            widget.set("class", "QWidget")
            outer = element("layout", **{"class": "QVBoxLayout", "name": f"{name}__outer"})
            margins_zero(outer)
            header = element("widget", **{"class": "QToolButton", "name": f"{name}__header"})
            header.append(string_property("text", title.findtext("string") if title is not None else name))
            body = element("widget", **{"class": "QFrame", "name": f"{name}__body"})
            body.append(contents)
            for child in (header, body):
                item = element("item")
                item.append(child)
                outer.append(item)
            widget.append(outer)
        elif cls == "qMRMLNodeComboBox":
            widget.set("class", "QComboBox")
            dropped = keep_qt_properties(widget, "QComboBox")
            none = dropped.get("noneDisplay")
            found[name] = {"kind": "nodes", "none": value_of(none) if none is not None else "None"}
        elif cls == "ctkSliderWidget":
            widget.set("class", "QWidget")
            dropped = keep_qt_properties(widget, "QWidget")
            found[name] = {"kind": "slider", **{key: value_of(prop) for key, prop in dropped.items()}}
        else:
            base = "QWidget" if widget is top else qt_base(cls, custom)
            widget.set("class", base)
            keep_qt_properties(widget, base)
    for declarations in root.findall("customwidgets"):
        root.remove(declarations)
    for connections in root.findall("connections"):  # Slicer's signals (mrmlSceneChanged ...): none here
        for connection in connections.findall("connection"):
            if {connection.findtext("sender"), connection.findtext("receiver")} & replaced:
                connections.remove(connection)
    return found


def finish_stand_ins(panel: QtWidgets.QWidget, found: Dict[str, dict]) -> None:
    for name, info in found.items():
        widget = panel.findChild(QtWidgets.QWidget, name)
        if info["kind"] == "collapsible":
            header = widget.findChild(QtWidgets.QToolButton, f"{name}__header")
            body = widget.findChild(QtWidgets.QFrame, f"{name}__body")
            header.setToolButtonStyle(QtCore.Qt.ToolButtonTextBesideIcon)
            header.setSizePolicy(QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Fixed)
            header.setArrowType(QtCore.Qt.RightArrow if info["collapsed"] else QtCore.Qt.DownArrow)
            body.setFrameShape(QtWidgets.QFrame.StyledPanel)
            body.setVisible(not info["collapsed"])
        elif info["kind"] == "nodes":
            widget.addItem(info["none"])
        elif info["kind"] == "slider":
            layout = QtWidgets.QHBoxLayout(widget)
            layout.setContentsMargins(0, 0, 0, 0)
            low, high, step = info.get("minimum", 0.0), info.get("maximum", 99.0), info.get("singleStep", 1.0)
            slider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
            slider.setRange(0, round((high - low) / step))
            slider.setValue(round((info.get("value", low) - low) / step))
            spin = QtWidgets.QDoubleSpinBox()
            spin.setDecimals(int(info.get("decimals", 2)))
            spin.setRange(low, high)
            spin.setSingleStep(step)
            spin.setValue(info.get("value", low))
            layout.addWidget(slider, 1)
            layout.addWidget(spin)


# --- a panel after one Segment run -----------------------------------------------------------------------


def fill(panel: QtWidgets.QWidget, details: bool) -> None:
    """What MedSegUNetWidget.setup and one Segment run put in the widgets (by objectName: a renamed widget
    fails here, so that the picture is redrawn along with the code)."""
    text = module_text_functions()
    summary, _separator, described = text["describeModel"](MODEL).partition("\n")
    from MedSegUNetLib.model.bundle import read_bundle_metadata  # found once module_text_functions ran

    structures = len(read_bundle_metadata(MODEL).labels)

    def find(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise SystemExit(f"{UI_FILE.name} has no {cls.__name__} named {name}: update {Path(__file__).name}")
        return widget

    volume = find(QtWidgets.QComboBox, "inputVolumeSelector")
    volume.clear()
    volume.addItem("CT chest")
    find(QtWidgets.QComboBox, "modelComboBox").addItem(text["modelLabel"](MODEL))
    find(QtWidgets.QComboBox, "deviceComboBox").addItems(["Auto", "CPU"])
    find(QtWidgets.QLabel, "modelInfoLabel").setText(summary)
    find(QtWidgets.QLabel, "modelDetailsLabel").setText(described)
    find(QtWidgets.QLabel, "modelDetailsLabel").setVisible(details)
    button = find(QtWidgets.QToolButton, "modelDetailsButton")
    button.setChecked(details)
    button.setArrowType(QtCore.Qt.DownArrow if details else QtCore.Qt.RightArrow)
    find(QtWidgets.QPushButton, "segmentButton").setEnabled(True)
    progress = find(QtWidgets.QProgressBar, "progressBar")
    progress.setRange(0, 1)
    progress.setValue(1)
    find(QtWidgets.QLabel, "statusLabel").setText(f"Done: {structures} segments in 'CT chest segmentation'.")
    find(QtWidgets.QPushButton, "showLogButton").setEnabled(True)
    cases = find(QtWidgets.QListWidget, "casesListWidget")
    for entry in ("CT chest  +  CT chest segmentation", "case007.mrb"):
        item = QtWidgets.QListWidgetItem(entry)
        item.setFlags(item.flags() | QtCore.Qt.ItemIsUserCheckable)
        item.setCheckState(QtCore.Qt.Checked)
        cases.addItem(item)
    find(QtWidgets.QLabel, "retrainTargetLabel").setText(
        f"Fine-tunes {text['modelLabel'](MODEL)} on a GPU if one is found, else on the CPU."
    )
    find(QtWidgets.QProgressBar, "retrainProgressBar").hide()  # no Retrain run yet


def quiet_offscreen(kind, context, message: str) -> None:
    if "propagateSizeHints" not in message:  # the offscreen platform's note on every window: not a problem
        print(message, file=sys.stderr)


def draw(output: Path, details: bool) -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display needed
    QtCore.qInstallMessageHandler(quiet_offscreen)
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["draw_panel"])
    app.setStyle("Fusion")
    app.setFont(QtGui.QFont("DejaVu Sans", 9))
    root = ElementTree.fromstring(UI_FILE.read_text(encoding="utf-8"))
    found = stand_ins(root, json.loads(API_FILE.read_text(encoding="utf-8"))["ui_custom_widgets"])
    buffer = QtCore.QBuffer()
    buffer.setData(ElementTree.tostring(root, encoding="utf-8"))
    buffer.open(QtCore.QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    if panel is None:
        raise SystemExit(f"QUiLoader could not load {UI_FILE}: {loader.errorString()}")
    finish_stand_ins(panel, found)
    fill(panel, details)
    panel.setFixedWidth(WIDTH)
    panel.show()
    app.processEvents()
    height = panel.layout().totalHeightForWidth(WIDTH)
    panel.setFixedHeight(height if height > 0 else panel.sizeHint().height())
    app.processEvents()
    output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(output)):
        raise SystemExit(f"could not write {output}")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help=f"the PNG (default: {OUTPUT})")
    parser.add_argument("--details", action="store_true", help="draw the model's details open")
    args = parser.parse_args()
    print(draw(args.output, args.details))


if __name__ == "__main__":
    main()

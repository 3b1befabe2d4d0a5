"""Static checks of the Slicer module against Slicer's real API (Testing/data/slicer-api), without Slicer.

MedSegUNet.py imports slicer, qt and vtk, which exist only inside Slicer, so it is read as source (ast),
never imported. Every checker is also run on a bad snippet, so that a checker that cannot fail is caught.
"""

from __future__ import annotations

import ast
import json
import os
import re
import unittest
import xml.etree.ElementTree as ElementTree
from functools import lru_cache
from typing import Dict, List, Optional, Set, Tuple

import pytest
from conftest import REPO

MODULE_FILE = REPO / "MedSegUNet" / "MedSegUNet.py"
UI_FILE = REPO / "MedSegUNet" / "Resources" / "UI" / "MedSegUNet.ui"
ENGINE = REPO / "MedSegUNet" / "MedSegUNetLib"
NODE_WORK = REPO / "MedSegUNet" / "MedSegUNetMRML"
PANEL_TEXT = REPO / "MedSegUNet" / "MedSegUNetPanel"
TRAINING = REPO / "training"
API_FOLDER = REPO / "Testing" / "data" / "slicer-api"
API_VERSIONS = ["slicer_api_v5.8.1.json", "slicer_api_v5.12.3.json"]  # the oldest supported, the newest

# Qt 5 QtWidgets classes a .ui may use besides Slicer's own (the API file's ui_custom_widgets).
QT_WIDGETS = {
    "QWidget",
    "QLabel",
    "QPushButton",
    "QToolButton",
    "QCheckBox",
    "QRadioButton",
    "QComboBox",
    "QSpinBox",
    "QDoubleSpinBox",
    "QLineEdit",
    "QTextEdit",
    "QPlainTextEdit",
    "QProgressBar",
    "QListWidget",
    "QTreeWidget",
    "QTableWidget",
    "QGroupBox",
    "QFrame",
    "QTabWidget",
    "QStackedWidget",
    "QScrollArea",
    "QSlider",
    "QSplitter",
    "QDialogButtonBox",
}
# Names the `slicer` package has at run time besides MRML classes: Base/Python/slicer/__init__.py and
# slicerqt.py (app, mrmlScene, modules ...) and the Python packages the API file describes.
SLICER_GLOBALS = {
    "app",
    "mrmlScene",
    "modules",
    "moduleNames",
    "util",
    "ScriptedLoadableModule",
    "parameterNodeWrapper",
}
# qSlicerCoreApplication members (Q_PROPERTY / public slots of qSlicerCoreApplication.h and QCoreApplication).
SLICER_APP_MEMBERS = {
    "temporaryPath",
    "slicerUserSettingsFilePath",
    "processEvents",
    "applicationDirPath",
    "cachePath",
    "defaultScenePath",
    "slicerHome",
    "userSettings",
    "revisionUserSettings",
    "majorVersion",
    "minorVersion",
}
# parameterNodeWrapper field type -> widgets it can be bound to: the canRepresent() of the connectors in
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py of v5.8.1, the oldest release supported (5.12.3
# accepts more: ctkCheckablePushButton for bool, the float widgets for int).
BINDABLE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "int": {"QSlider", "QSpinBox"},
    "float": {
        "QDoubleSpinBox",
        "ctkSliderWidget",
        "qMRMLSliderWidget",
        "ctkDoubleSlider",
        "ctkDoubleSpinBox",
        "qMRMLSpinBox",
    },
    "str": {"QComboBox", "ctkComboBox", "QLineEdit", "QLabel", "QTextEdit"},
    "node": {"qMRMLNodeComboBox"},
}


@lru_cache(maxsize=None)
def api(name: str) -> dict:
    path = API_FOLDER / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the Slicer API snapshots are part of the repository")
    return json.loads(path.read_text(encoding="utf-8"))


def module_tree(source: Optional[str] = None) -> ast.Module:
    return ast.parse(source if source is not None else MODULE_FILE.read_text(encoding="utf-8"))


def ui_text() -> str:
    return UI_FILE.read_text(encoding="utf-8")


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        parts.append(dotted(node.func) + "()")
    return ".".join(reversed(parts))


# --- checkers: slicer.util, slicer.*, imports ------------------------------------------------------


def slicer_util_calls(tree: ast.Module) -> Dict[str, Set[str]]:
    """slicer.util function name -> keyword arguments used with it (also names used without a call)."""
    calls: Dict[str, Set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and dotted(node.func).startswith("slicer.util."):
            name = dotted(node.func).split(".")[2]
            calls.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
        elif (
            isinstance(node, ast.Attribute) and dotted(node).startswith("slicer.util.") and dotted(node).count(".") == 2
        ):
            calls.setdefault(node.attr, set())
    return calls


def unknown_util_calls(tree: ast.Module, data: dict) -> List[str]:
    functions = data["python"]["slicer.util"]["functions"]
    problems = []
    for name, keywords in sorted(slicer_util_calls(tree).items()):
        if name not in functions and name not in data["python"]["slicer.util"]["classes"]:
            problems.append(f"slicer.util.{name}")
            continue
        parameters = functions.get(name, [])
        if name in functions and not any(p.startswith("**") for p in parameters):
            problems += [f"slicer.util.{name}({k}=)" for k in sorted(keywords) if k not in parameters]
    return problems


def imported_names(tree: ast.Module, module: str) -> Set[str]:
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }


def unknown_imports(tree: ast.Module, data: dict) -> List[str]:
    python = data["python"]
    allowed = {
        "slicer.parameterNodeWrapper": set(python["slicer.parameterNodeWrapper"]["names"]),
        "slicer.ScriptedLoadableModule": set(python["slicer.ScriptedLoadableModule"]["classes"]),
        "slicer.util": set(python["slicer.util"]["functions"]) | set(python["slicer.util"]["classes"]),
    }
    return sorted(
        f"{module}.{name}" for module, names in allowed.items() for name in imported_names(tree, module) - names
    )


def unknown_slicer_globals(tree: ast.Module, data: dict) -> List[str]:
    """`slicer.X` must be a name the slicer package has; `slicer.app.X` a qSlicerCoreApplication member."""
    problems = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = dotted(node)
        if name.count(".") == 1 and name.startswith("slicer."):
            if node.attr not in SLICER_GLOBALS and node.attr not in data["mrml_classes"]:
                problems.add(name)
        elif name.count(".") == 2 and name.startswith("slicer.app.") and node.attr not in SLICER_APP_MEMBERS:
            problems.add(name)
    return sorted(problems)


# --- checkers: MRML and VTK methods, attributed to classes -----------------------------------------

UTIL_RETURNS = {"loadSegmentation": "vtkMRMLSegmentationNode", "addVolumeFromArray": "vtkMRMLScalarVolumeNode"}
NODE_FACTORIES = {"AddNewNodeByClass", "CreateNodeByClass", "GetFirstNodeByClass"}
METHOD_RETURNS = {  # methods whose result's class does not depend on the receiver (checked: see the test)
    "GetSegmentation": "vtkSegmentation",
    "GetSegment": "vtkSegment",
    "GetNthSegment": "vtkSegment",
    "GetBinaryLabelmapInternalRepresentation": "vtkOrientedImageData",
}
OWN_RETURNS = {  # MedSegUNetLogic methods and the class of what they return
    "outputNodeFor": "vtkMRMLSegmentationNode",
    "loadResult": "vtkMRMLSegmentationNode",
    "referenceVolume": "vtkMRMLVolumeNode",
}
NAMING_CONVENTION = {  # function parameters named so hold nodes of that class
    "volumeNode": "vtkMRMLScalarVolumeNode",
    "segmentationNode": "vtkMRMLSegmentationNode",
    "sourceNode": "vtkMRMLSegmentationNode",
    "targetNode": "vtkMRMLSegmentationNode",
}


def vtk_class(name: str):
    import vtk

    return getattr(vtk, name, None)


def class_has_method(cls: str, method: str, data: dict) -> bool:
    """Along the base chain of the API file; bases outside it (vtkObject, vtkImageData ...) from the vtk package."""
    seen = set()
    while cls and cls not in seen:
        seen.add(cls)
        if cls.startswith("vtk:"):
            real = vtk_class(cls[4:])
            return real is not None and hasattr(real, method)
        info = data["mrml_classes"].get(cls)
        if info is None:
            real = vtk_class(cls) or vtk_class("vtkObject")  # a Slicer base outside the file: vtkObject's at least
            return hasattr(real, method)
        if method in info["methods"]:
            return True
        cls = info.get("base")
    return False


def parameter_node_types(tree: ast.Module) -> Dict[str, str]:
    """parameterNodeWrapper fields annotated with a MRML class -> that class."""
    return {
        name: annotation for name, annotation in parameter_annotations(tree).items() if annotation.startswith("vtkMRML")
    }


class TypeInference:
    """The MRML/VTK class of expressions in one function: enough to check the methods called on them."""

    def __init__(self, function: ast.FunctionDef, fields: Dict[str, str]):
        self.fields = fields
        self.names: Dict[str, str] = {}
        for argument in function.args.args + function.args.kwonlyargs:
            if argument.arg in NAMING_CONVENTION:
                self.names[argument.arg] = NAMING_CONVENTION[argument.arg]
        statements = sorted(
            (n for n in ast.walk(function) if isinstance(n, (ast.Assign, ast.For))), key=lambda n: n.lineno
        )
        for _ in range(2):  # twice: an assignment may use a name assigned later in the walk order
            for statement in statements:
                self.bind(statement)

    def bind(self, statement) -> None:
        if isinstance(statement, ast.For) and isinstance(statement.target, ast.Name):
            call = statement.iter
            if (
                isinstance(call, ast.Call)
                and dotted(call.func) == "slicer.util.getNodesByClass"
                and string_argument(call)
            ):
                self.names[statement.target.id] = string_argument(call)
            return
        if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
            return
        target, value = statement.targets[0], statement.value
        pairs = (
            zip(target.elts, value.elts)
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
            else [(target, value)]
        )
        for name, expression in pairs:
            cls = self.type_of(expression)
            if isinstance(name, ast.Name) and cls:
                self.names[name.id] = cls

    def type_of(self, node: ast.AST) -> Optional[str]:
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            if dotted(node) == "slicer.mrmlScene":
                return "vtkMRMLScene"
            return self.fields.get(node.attr)
        if isinstance(node, ast.Call):
            function = dotted(node.func)
            if function.startswith("slicer.util.") and function.split(".")[2] in UTIL_RETURNS:
                return UTIL_RETURNS[function.split(".")[2]]
            if function.startswith("vtk.vtk") and function.count(".") == 1:
                return "vtk:" + function.split(".")[1]
            if isinstance(node.func, ast.Attribute):
                if node.func.attr in NODE_FACTORIES and string_argument(node):
                    return string_argument(node)
                if dotted(node.func.value) in ("self", "logic", "MedSegUNetLogic") and node.func.attr in OWN_RETURNS:
                    return OWN_RETURNS[node.func.attr]
                return METHOD_RETURNS.get(node.func.attr)
        return None


def string_argument(call: ast.Call) -> Optional[str]:
    first = call.args[0] if call.args else None
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def functions_of(tree: ast.Module):
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]


def attributed_calls(tree: ast.Module) -> List[Tuple[str, str, int]]:
    """(class, method, line) for every call whose receiver's class is known."""
    fields = parameter_node_types(tree)
    found = set()
    for function in functions_of(tree):
        types = TypeInference(function, fields)
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                cls = types.type_of(node.func.value)
                if cls:
                    found.add((cls, node.func.attr, node.lineno))
    return sorted(found)


def unknown_attributed_methods(tree: ast.Module, data: dict) -> List[str]:
    return [
        f"{cls}.{method} (line {line})"
        for cls, method, line in attributed_calls(tree)
        if not class_has_method(cls, method, data)
    ]


def vtk_method_names(tree: ast.Module) -> Set[str]:
    """Methods of vtkObject and of the vtk classes the module creates (vtk.vtkMatrix4x4() ...)."""
    import vtk

    classes = [vtk.vtkObject, vtk.vtkCommand]
    classes += [
        vtk_class(cls[4:]) for cls, _, _ in attributed_calls(tree) if cls.startswith("vtk:") and vtk_class(cls[4:])
    ]
    return {name for cls in classes for name in dir(cls) if name[:1].isupper()}


def unknown_mrml_methods(tree: ast.Module, data: dict) -> List[str]:
    """Any call of a CamelCase method (VTK/MRML style; Qt's are camelCase) that no MRML or VTK class has."""
    known = {method for cls in data["mrml_classes"].values() for method in cls["methods"]} | vtk_method_names(tree)
    modules = {
        alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and not (
            isinstance(node.func.value, ast.Name) and node.func.value.id in modules
        )  # module.Class(): a constructor
    }
    return sorted(name for name in called if re.match(r"^[A-Z][a-z]", name) and name not in known)


def scene_class_names(tree: ast.Module) -> Set[str]:
    """Class names passed as strings to AddNewNodeByClass / CreateNodeByClass / getNodesByClass ..."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and "ByClass" in node.func.attr
            and string_argument(node)
        ):
            names.add(string_argument(node))
    names.update(
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and dotted(n).startswith("slicer.vtkMRML")
    )
    return names


# --- checkers: the scripted-module classes' own calls -----------------------------------------------


def inherited_methods(bases: List[str], data: dict) -> Set[str]:
    classes = data["python"]["slicer.ScriptedLoadableModule"]["classes"]
    mixins = data["python"]["slicer.util"]["classes"]
    names: Set[str] = set()
    for base in bases:
        if base in classes:
            names |= set(classes[base]["methods"])
            if "unittest.TestCase" in classes[base]["bases"]:
                names |= set(dir(unittest.TestCase))
        elif base in mixins:
            names |= set(mixins[base]["methods"])
    return names


def unknown_self_calls(tree: ast.Module, data: dict) -> List[str]:
    """`self.f()` and `super().f()` in a class based on Slicer's classes: defined there or inherited."""
    problems = []
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        bases = [dotted(b) for b in cls.bases]
        inherited = inherited_methods(bases, data)
        if not inherited:
            continue
        own = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
        own |= {
            t.attr
            for n in ast.walk(cls)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Attribute) and dotted(t.value) == "self"
        }
        own |= {
            t.target.attr for t in ast.walk(cls) if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Attribute)
        }
        for node in ast.walk(cls):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = dotted(node.func.value)
                if receiver == "self" and node.func.attr not in own | inherited:
                    problems.append(f"{cls.name}: self.{node.func.attr}()")
                elif receiver == "super()" and node.func.attr not in inherited:
                    problems.append(f"{cls.name}: super().{node.func.attr}()")
    return sorted(set(problems))


# --- checkers: the .ui and the parameter node --------------------------------------------------------


def ui_widgets(text: str) -> Dict[str, str]:
    return {w.get("name"): w.get("class") for w in ElementTree.fromstring(text).iter("widget")}


def ui_custom_declarations(text: str) -> Dict[str, Tuple[str, str]]:
    root = ElementTree.fromstring(text)
    return {c.findtext("class"): (c.findtext("extends"), c.findtext("header")) for c in root.iter("customwidget")}


def ui_bad_classes(text: str, data: dict) -> List[str]:
    """Widget classes that are neither Qt nor Slicer's, and custom widgets declared unlike Slicer declares them."""
    custom = data["ui_custom_widgets"]
    declared = ui_custom_declarations(text)
    problems = []
    for cls in sorted(set(ui_widgets(text).values())):
        if cls in QT_WIDGETS:
            continue
        if cls not in custom:
            problems.append(f"{cls}: not a Qt or Slicer widget")
        elif declared.get(cls) != (custom[cls]["extends"], custom[cls]["header"]):
            problems.append(
                f"{cls}: declared as {declared.get(cls)}, Slicer has {(custom[cls]['extends'], custom[cls]['header'])}"
            )
    return problems


def ui_bound_widgets(text: str) -> Dict[str, ElementTree.Element]:
    """SlicerParameterName -> the widget element carrying it."""
    found = {}
    for widget in ElementTree.fromstring(text).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = widget
    return found


def widget_property(widget: ElementTree.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag == "stringlist":
                return [s.text for s in value.findall("string")]
            if value.tag in ("double", "number"):
                return float(value.text)
            return value.text
    return None


def ui_attributes_used(tree: ast.Module) -> Set[str]:
    """X of every `self.ui.X` (and `widget.ui.X` in the self-test)."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and dotted(node.value) in ("self.ui", "widget.ui")
    }


def parameter_class(tree: ast.Module) -> Optional[ast.ClassDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(dotted(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return node
    return None


def parameter_annotations(tree: ast.Module) -> Dict[str, str]:
    """Field -> its type: bool, int, float, str, or a MRML class name (Annotated[...] unwrapped)."""
    cls = parameter_class(tree)
    fields = {}
    for item in cls.body if cls else []:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            annotation = item.annotation
            if isinstance(annotation, ast.Subscript) and dotted(annotation.value) == "Annotated":
                annotation = annotation.slice.elts[0]
            fields[item.target.id] = dotted(annotation).replace("slicer.", "")
    return fields


def parameter_ranges(tree: ast.Module) -> Dict[str, Tuple[float, float]]:
    cls = parameter_class(tree)
    ranges = {}
    for item in cls.body if cls else []:
        if isinstance(item, ast.AnnAssign) and isinstance(item.annotation, ast.Subscript):
            for extra in item.annotation.slice.elts[1:]:
                if isinstance(extra, ast.Call) and dotted(extra.func) == "WithinRange":
                    ranges[item.target.id] = tuple(float(ast.literal_eval(a)) for a in extra.args)
    return ranges


def parameter_binding_problems(tree: ast.Module, text: str) -> List[str]:
    """Each field has a widget of a kind that can show its type (node types, ranges); each bound widget a field."""
    fields, bound = parameter_annotations(tree), ui_bound_widgets(text)
    problems = [f"{name}: no widget with this SlicerParameterName" for name in sorted(set(fields) - set(bound))]
    problems += [
        f"{name}: a widget is bound to it but the parameter node has no such field"
        for name in sorted(set(bound) - set(fields))
    ]
    for name in sorted(set(fields) & set(bound)):
        kind = "node" if fields[name].startswith("vtkMRML") else fields[name]
        widget = bound[name]
        if widget.get("class") not in BINDABLE.get(kind, set()):
            problems.append(f"{name}: a {kind} cannot be bound to a {widget.get('class')}")
        if kind == "node" and fields[name] not in (widget_property(widget, "nodeTypes") or []):
            problems.append(f"{name}: the combo box does not list {fields[name]}")
    for name, (low, high) in sorted(parameter_ranges(tree).items()):
        if name in bound and (widget_property(bound[name], "minimum"), widget_property(bound[name], "maximum")) != (
            low,
            high,
        ):
            problems.append(f"{name}: the widget's range differs from WithinRange({low:g}, {high:g})")
    return problems


# The panel's reading order: the first section's inputs, then its button with that run's progress bar, status line
# and Show log right under it, then the options in a collapsed Advanced section; Retraining likewise.
PANEL_RUNS = {
    "segmentCollapsibleButton": ["segmentButton", "progressBar", "statusLabel", "showLogButton"],
    "retrainCollapsibleButton": ["retrainButton", "retrainProgressBar", "retrainStatusLabel", "retrainShowLogButton"],
}
SEGMENT_INPUTS = ["inputVolumeSelector", "modelComboBox", "modelInfoLabel", "outputSegmentationSelector"]
ADVANCED_OPTIONS = [
    "deviceComboBox",
    "ttaCheckBox",
    "largestComponentCheckBox",
    "overlapSliderWidget",
    "keepReadyCheckBox",
]


def ui_layout_problems(text: str) -> List[str]:
    """Where the panel's widgets are, against PANEL_RUNS, SEGMENT_INPUTS and ADVANCED_OPTIONS."""
    widgets = {w.get("name"): w for w in ElementTree.fromstring(text).iter("widget")}

    def inside(name: str) -> List[str]:
        return [w.get("name") for w in widgets[name].iter("widget")][1:] if name in widgets else []

    problems = []
    for section, run in PANEL_RUNS.items():
        names = inside(section)
        missing = [name for name in run if name not in names]
        if missing:
            problems.append(f"{section}: has no {', '.join(missing)}")
        elif names[names.index(run[0]) : names.index(run[0]) + len(run)] != run:
            problems.append(f"{section}: {', '.join(run[1:])} are not right under {run[0]}")
        button_text = widget_property(widgets[run[0]], "text") if run[0] in widgets else None
        if section in widgets and widget_property(widgets[section], "text") == button_text:
            problems.append(f"{section}: titled like its button, '{button_text}'")
    segment = inside("segmentCollapsibleButton")
    order = [segment.index(name) if name in segment else -1 for name in SEGMENT_INPUTS + ["segmentButton"]]
    if order != sorted(order) or -1 in order:
        problems.append(f"segmentCollapsibleButton: not in the order {', '.join(SEGMENT_INPUTS)}, segmentButton")
    advanced = inside("advancedCollapsibleButton")
    if "advancedCollapsibleButton" not in segment:
        problems.append("advancedCollapsibleButton: not in segmentCollapsibleButton")
    elif widget_property(widgets["advancedCollapsibleButton"], "collapsed") != "true":
        problems.append("advancedCollapsibleButton: not collapsed")
    if not set(ADVANCED_OPTIONS) <= set(advanced):
        problems.append(f"advancedCollapsibleButton: lacks {', '.join(sorted(set(ADVANCED_OPTIONS) - set(advanced)))}")
    if set(advanced) & set(SEGMENT_INPUTS + PANEL_RUNS["segmentCollapsibleButton"]):
        problems.append("advancedCollapsibleButton: holds inputs or the run's widgets")
    return problems


SHOWN_ATTRIBUTES = {"text", "toolTip", "windowTitle", "placeholderText"}
DISPLAY_CALLS = re.compile(r"(error|warning|info)Display|confirm\w*Display|tryWithErrorDisplay|delayDisplay")


def prose(node: ast.AST) -> bool:
    """A literal a person reads: an f-string, or a string with a letter and a space."""
    if isinstance(node, ast.JoinedStr):
        return True
    text = node.value if isinstance(node, ast.Constant) else None
    return isinstance(text, str) and bool(re.search(r"[A-Za-z].* ", text))


def shown_texts(tree: ast.Module, classes: Set[str]) -> List[ast.AST]:
    """Expressions these classes show: raised messages, widget texts and tooltips, message boxes."""
    shown: List[ast.AST] = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in classes):
        for node in ast.walk(cls):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                shown += node.exc.args
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr in SHOWN_ATTRIBUTES for t in node.targets
            ):
                shown.append(node.value)
            elif isinstance(node, ast.Call) and DISPLAY_CALLS.search(dotted(node.func)):
                shown += node.args[:1]
    return shown


def bare_prose(node: ast.AST) -> List[ast.AST]:
    """The literals in an expression that a person would read untranslated (outside any _() call)."""
    if isinstance(node, ast.Call) and dotted(node.func) == "_":
        return []
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return bare_prose(node.func.value)  # the template is what is read
    if isinstance(node, ast.IfExp):
        return bare_prose(node.body) + bare_prose(node.orelse)
    if isinstance(node, ast.BinOp):
        return bare_prose(node.left) + bare_prose(node.right)
    return [node] if prose(node) else []  # names and other calls: texts made elsewhere


def untranslated(tree: ast.Module, classes: Set[str]) -> List[str]:
    """Prose the classes show that is not wrapped in _(), as Slicer's template wraps it."""
    return [f"line {n.lineno}: {ast.unparse(n)[:60]}" for e in shown_texts(tree, classes) for n in bare_prose(e)]


def module_level_imports(tree: ast.Module) -> Set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.Try, ast.If)):
            names.update(module_level_imports(ast.Module(body=node.body, type_ignores=[])))
    return names


# --- the checks on the module ----------------------------------------------------------------------


@pytest.mark.parametrize("version", API_VERSIONS)
def test_every_slicer_util_call_exists(version):
    data = api(version)
    assert unknown_util_calls(module_tree(), data) == []
    assert len(slicer_util_calls(module_tree())) >= 15  # the parser sees the calls
    bad = module_tree("slicer.util.loadVolumeFromSpace(1)\nslicer.util.loadUI(p, colour=1)\nslicer.util.pip_install")
    assert unknown_util_calls(bad, data) == ["slicer.util.loadUI(colour=)", "slicer.util.loadVolumeFromSpace"]


@pytest.mark.parametrize("version", API_VERSIONS)
def test_imports_from_slicer_exist(version):
    data = api(version)
    tree = module_tree()
    assert unknown_imports(tree, data) == []
    assert {"parameterNodeWrapper", "WithinRange"} <= imported_names(tree, "slicer.parameterNodeWrapper")
    assert {
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
    } <= imported_names(tree, "slicer.ScriptedLoadableModule")
    bad = module_tree(
        "from slicer.parameterNodeWrapper import parameterNodeWrapperV2\nfrom slicer.util import VTKObserverMixin"
    )
    assert unknown_imports(bad, data) == [
        "slicer.parameterNodeWrapper.parameterNodeWrapperV2",
        "slicer.util.VTKObserverMixin",
    ]


@pytest.mark.parametrize("version", API_VERSIONS)
def test_slicer_globals_exist(version):
    data = api(version)
    assert unknown_slicer_globals(module_tree(), data) == []
    bad = module_tree(
        "slicer.mrmlScen.Clear()\nslicer.vtkMRMLSegmentationNode\nslicer.app.temporaryFolder\nslicer.vtkMRMLNoSuchNode"
    )
    assert unknown_slicer_globals(bad, data) == [
        "slicer.app.temporaryFolder",
        "slicer.mrmlScen",
        "slicer.vtkMRMLNoSuchNode",
    ]


@pytest.mark.parametrize("version", API_VERSIONS)
def test_methods_called_on_known_mrml_classes_exist_on_those_classes(version):
    data = api(version)
    tree = module_tree()
    assert unknown_attributed_methods(tree, data) == []
    attributed = attributed_calls(tree)
    assert len(attributed) >= 25, attributed  # the inference follows the module's nodes
    assert {cls for cls, _, _ in attributed} >= {
        "vtkMRMLScene",
        "vtkMRMLSegmentationNode",
        "vtkSegmentation",
        "vtkMRMLVolumeNode",
        "vtkMRMLScalarVolumeNode",
    }
    assert ("vtkMRMLSegmentationNode", "GetSegmentation") in {(c, m) for c, m, _ in attributed}
    for method, cls in METHOD_RETURNS.items():  # these names mean one thing across the API
        owners = [c for c, info in data["mrml_classes"].items() if method in info["methods"]]
        assert cls in {"vtkSegmentation", "vtkSegment", "vtkOrientedImageData"} and owners, (method, owners)
    bad = module_tree(
        "def f(volumeNode):\n"
        "    node = slicer.mrmlScene.AddNewNodeByClass('vtkMRMLSegmentationNode')\n"
        "    node.GetSegment('x')\n"  # a vtkSegmentation method, not a node's
        "    node.GetSegmentation().GetSegmentIdBySegmentName('x')\n"
        "    volumeNode.GetSegmentation()\n"
        "    slicer.mrmlScene.GetFirstNodeByClass('vtkMRMLScalarVolumeNode').GetIJKToRASMatrix(m)\n"
        "    storage = slicer.mrmlScene.CreateNodeByClass('vtkMRMLVolumeArchetypeStorageNode')\n"
        "    storage.UnRegister(None)\n"  # from vtkObjectBase, through the vtk package
        "    matrix = vtk.vtkMatrix4x4()\n"
        "    matrix.Invert()\n"
        "    matrix.Inverse()\n"
    )
    assert unknown_attributed_methods(bad, data) == [
        "vtk:vtkMatrix4x4.Inverse (line 11)",
        "vtkMRMLScalarVolumeNode.GetSegmentation (line 5)",
        "vtkMRMLSegmentationNode.GetSegment (line 3)",
    ]


@pytest.mark.parametrize("version", API_VERSIONS)
def test_every_mrml_method_and_node_class_exists(version):
    """Calls the inference cannot attribute: the method must exist on some MRML/VTK class at least."""
    data = api(version)
    assert unknown_mrml_methods(module_tree(), data) == []
    for path in sorted(NODE_WORK.glob("*.py")):  # the node work, also run on slicer-core (test_mrml.py)
        assert unknown_mrml_methods(module_tree(path.read_text(encoding="utf-8")), data) == [], path.name
    snippet = (
        "import tempfile\nnode.GetSegmentationz()\nnode.SetName('a')\nwidget.setText('x')\n"
        "tempfile.TemporaryDirectory()"
    )
    assert unknown_mrml_methods(module_tree(snippet), data) == ["GetSegmentationz"]
    classes = scene_class_names(module_tree())
    for path in sorted(NODE_WORK.glob("*.py")):
        classes |= scene_class_names(module_tree(path.read_text(encoding="utf-8")))
    assert {"vtkMRMLSegmentationNode", "vtkMRMLVolumeArchetypeStorageNode", "vtkMRMLSegmentationStorageNode"} <= classes
    assert classes <= set(data["mrml_classes"]), classes - set(data["mrml_classes"])


@pytest.mark.parametrize("version", API_VERSIONS)
def test_scripted_module_classes_call_only_what_they_have(version):
    data = api(version)
    assert unknown_self_calls(module_tree(), data) == []
    bad = module_tree(
        "class W(ScriptedLoadableModuleWidget, VTKObservationMixin):\n"
        "    def setup(self):\n"
        "        self.resourcePath('x'); self.addObserver(a, b, c); self.helper(); self.loadUI('x')\n"
        "    def helper(self):\n"
        "        super().setupDeveloperSection(); super().enter()\n"
        "class T(ScriptedLoadableModuleTest):\n"
        "    def test_a(self):\n"
        "        self.delayDisplay('x'); self.assertEqual(1, 1); self.assertEquals2(1, 1)\n"
    )
    assert unknown_self_calls(bad, data) == ["T: self.assertEquals2()", "W: self.loadUI()", "W: super().enter()"]


def test_the_four_classes_slicer_expects():
    tree = module_tree()
    classes = {node.name: [dotted(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["MedSegUNet"] == ["ScriptedLoadableModule"]
    assert classes["MedSegUNetWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["MedSegUNetLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["MedSegUNetTest"] == ["ScriptedLoadableModuleTest"]
    test_methods = [
        f.name
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "MedSegUNetTest"
        for f in node.body
        if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
    ]
    assert len(test_methods) >= 4
    source = MODULE_FILE.read_text(encoding="utf-8")
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSegUNetTest")
    run_test = next(f for f in test_class.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    body = ast.get_source_segment(source, run_test) or ""
    # runTest (Reload and Test) runs every test_ method, found in the class in the order written
    assert 'type(self).__dict__ if name.startswith("test_")' in body and "getattr(self, name)" in body, body


def parameter_node_readers(tree: ast.Module, cls: str) -> List[str]:
    """Methods of the class that read the panel's parameter node (besides getParameterNode itself)."""
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return [
        method.name
        for method in logic.body
        if isinstance(method, ast.FunctionDef) and method.name != "getParameterNode"
        for node in ast.walk(method)
        if isinstance(node, ast.Attribute) and node.attr in ("getParameterNode", "_parameterNode")
    ]


def test_the_logic_takes_its_nodes_as_arguments():
    """As in Slicer's template: the Logic works on the nodes it is given, never on the panel's parameter node."""
    assert parameter_node_readers(module_tree(), "MedSegUNetLogic") == []
    bad = module_tree("class L:\n    def run(self):\n        return self.getParameterNode().inputVolume\n")
    assert parameter_node_readers(bad, "L") == ["run"]


LOGIC_RECEIVERS = {"self.logic", "logic", "widget.logic", "MedSegUNetLogic", "MedSegUNetLogic()"}


def logic_call_problems(tree: ast.Module) -> List[str]:
    """Calls of the Logic's methods (from the panel, the self-test or the Logic) that do not fit their signature:
    too many or too few positional arguments, or a keyword the method does not have."""
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSegUNetLogic")
    methods = {f.name: f for f in logic.body if isinstance(f, ast.FunctionDef)}
    problems = []
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        receivers = LOGIC_RECEIVERS | ({"self"} if cls is logic else set())
        for call in [n for n in ast.walk(cls) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]:
            method = methods.get(call.func.attr)
            if method is None or dotted(call.func.value) not in receivers:
                continue
            static = any(dotted(d) == "staticmethod" for d in method.decorator_list)
            names = [a.arg for a in method.args.args][0 if static else 1 :]
            required = names[: len(names) - len(method.args.defaults)]
            given = names[: len(call.args)] + [k.arg for k in call.keywords]
            wrong = (len(call.args) > len(names) and method.args.vararg is None) or not set(required) <= set(given)
            unknown = [k.arg for k in call.keywords if k.arg not in names and method.args.kwarg is None]
            if wrong or unknown:
                problems.append(f"line {call.lineno}: {ast.unparse(call)[:80]}")
    return problems


def test_every_call_of_the_logic_fits_its_signature():
    """The self-test runs only inside Slicer: its calls (and the panel's) are checked against the Logic here."""
    assert logic_call_problems(module_tree()) == []
    bad = module_tree(
        "class MedSegUNetLogic:\n"
        "    def startSegment(self, volumeNode, outputNode, model, surfaces=False): pass\n"
        "    @staticmethod\n"
        "    def loadResult(path, node): pass\n"
        "class T:\n"
        "    def test(self, logic):\n"
        "        logic.startSegment(volume, model)\n"  # too few
        "        logic.startSegment(volume, None, model, True, 1)\n"  # too many
        "        self.logic.startSegment(volume, None, model, show3D=True)\n"  # unknown keyword
        "        MedSegUNetLogic.loadResult(path, node)\n"  # fine: static
        "        logic.startSegment(volume, None, model=model, surfaces=True)\n"  # fine
    )
    assert [p.split(":")[0] for p in logic_call_problems(bad)] == ["line 7", "line 8", "line 9"]


def test_the_panel_and_logic_wrap_what_they_show_for_translation():
    """As Slicer's template does: every message the Widget or Logic shows or raises goes through _()."""
    assert untranslated(module_tree(), {"MedSegUNetWidget", "MedSegUNetLogic"}) == []
    bad = module_tree(
        "class W:\n"
        "    def f(self):\n"
        "        self.ui.label.text = 'Not wrapped here'\n"
        "        self.ui.button.toolTip = _('Wrapped, fine') if x else f'{y} unwrapped'\n"
        "        slicer.util.errorDisplay('Shown raw')\n"
        "        raise RuntimeError(_('fine {a}').format(a=1) + ' raw tail')\n"
        "        raise ValueError(_('Wrapped as well.'))\n"
    )
    assert len(untranslated(bad, {"W"})) == 4


@pytest.mark.parametrize("version", API_VERSIONS)
def test_every_ui_widget_class_is_qt_or_slicer(version):
    data = api(version)
    assert ui_bad_classes(ui_text(), data) == []
    assert {"qMRMLNodeComboBox", "ctkCollapsibleButton"} <= set(ui_widgets(ui_text()).values())
    bad = (
        ui_text()
        .replace('class="QListWidget"', 'class="qMRMLSegmentationEditorWidgetX"')
        .replace("<header>qMRMLNodeComboBox.h</header>", "<header>qMRMLNodeCombo.h</header>")
    )
    assert ui_bad_classes(bad, data) == [
        "qMRMLNodeComboBox: declared as ('QWidget', 'qMRMLNodeCombo.h'), Slicer has ('QWidget', 'qMRMLNodeComboBox.h')",
        "qMRMLSegmentationEditorWidgetX: not a Qt or Slicer widget",
    ]


def test_every_widget_the_code_touches_is_in_the_ui():
    widgets = ui_widgets(ui_text())
    used = ui_attributes_used(module_tree())
    assert len(used) >= 15, "the module touches few widgets: the parser is broken"
    assert "overlapSliderWidget" in used  # seen through widget.ui in the self-test
    assert used - set(widgets) == set()
    bad = module_tree("self.ui.noSuchButton.enabled = True\nwidget.ui.oldLabel.text = ''\nself.uiWidget.x = 1")
    assert ui_attributes_used(bad) - set(widgets) == {"noSuchButton", "oldLabel"}


def test_every_parameter_has_a_widget_that_can_show_it():
    tree = module_tree()
    assert {"inputVolume", "outputSegmentation", "useTTA", "largestComponent", "overlap", "show3D"} <= set(
        parameter_annotations(tree)
    )
    assert parameter_binding_problems(tree, ui_text()) == []
    bad_tree = module_tree(
        "@parameterNodeWrapper\nclass P:\n"
        "    inputVolume: slicer.vtkMRMLSegmentationNode\n"
        "    useTTA: float = 1.0\n"
        "    overlap: Annotated[float, WithinRange(0.0, 0.5)] = 0.5\n"
        "    extra: int = 1\n"
    )
    assert parameter_binding_problems(bad_tree, ui_text()) == [
        "extra: no widget with this SlicerParameterName",
        "largestComponent: a widget is bound to it but the parameter node has no such field",
        "outputSegmentation: a widget is bound to it but the parameter node has no such field",
        "retrainFromScratch: a widget is bound to it but the parameter node has no such field",
        "retrainMinutes: a widget is bound to it but the parameter node has no such field",
        "retrainSteps: a widget is bound to it but the parameter node has no such field",
        "show3D: a widget is bound to it but the parameter node has no such field",
        "inputVolume: the combo box does not list vtkMRMLSegmentationNode",
        "useTTA: a float cannot be bound to a QCheckBox",
        "overlap: the widget's range differs from WithinRange(0, 0.5)",
    ]


def test_the_panel_reads_in_order_and_shows_each_run_under_its_button():
    def swap(text: str, first: str, second: str) -> str:
        marked = text.replace(f'name="{first}"', 'name="swap"').replace(f'name="{second}"', f'name="{first}"')
        return marked.replace('name="swap"', f'name="{second}"')

    assert ui_layout_problems(ui_text()) == []
    bad = (
        swap(ui_text(), "progressBar", "retrainProgressBar")
        .replace("<string>Retraining</string>", "<string>Retrain</string>")
        .replace('name="ttaCheckBox"', 'name="ttaCheckBox2"')
        .replace('name="inputVolumeSelector"', 'name="inputVolumeSelector2"')
    )
    advanced = bad.index('name="advancedCollapsibleButton"')
    bad = bad[:advanced] + bad[advanced:].replace("<bool>true</bool>", "<bool>false</bool>", 1)
    assert ui_layout_problems(bad) == [
        "segmentCollapsibleButton: has no progressBar",
        "retrainCollapsibleButton: has no retrainProgressBar",
        "retrainCollapsibleButton: titled like its button, 'Retrain'",
        "segmentCollapsibleButton: not in the order inputVolumeSelector, modelComboBox, modelInfoLabel, "
        "outputSegmentationSelector, segmentButton",
        "advancedCollapsibleButton: not collapsed",
        "advancedCollapsibleButton: lacks ttaCheckBox",
    ]
    assert ui_layout_problems(swap(ui_text(), "statusLabel", "retrainTargetLabel")) == [
        "segmentCollapsibleButton: has no statusLabel"
    ]
    assert ui_layout_problems(swap(ui_text(), "statusLabel", "showLogButton")) == [
        "segmentCollapsibleButton: progressBar, statusLabel, showLogButton are not right under segmentButton"
    ]
    assert ui_layout_problems(swap(ui_text(), "deviceComboBox", "modelComboBox")) == [
        "segmentCollapsibleButton: not in the order inputVolumeSelector, modelComboBox, modelInfoLabel, "
        "outputSegmentationSelector, segmentButton",
        "advancedCollapsibleButton: lacks deviceComboBox",
        "advancedCollapsibleButton: holds inputs or the run's widgets",
    ]


def test_slicer_starts_without_torch_or_monai():
    """Neither the module nor what it imports at load time imports torch, MONAI or numpy-heavy engine parts."""
    heavy = {"torch", "monai", "SimpleITK", "numpy", "scipy", "training", "slicerio", "nrrd", "safetensors"}
    assert module_level_imports(module_tree()) & heavy == set()
    for name in ("host/childprocess.py", "host/__init__.py", "__init__.py"):  # what MedSegUNet.py imports at load time
        assert module_level_imports(ast.parse((ENGINE / name).read_text(encoding="utf-8"))) & heavy == set(), name
    lib_imports = {
        n.module
        for n in module_tree().body
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("MedSegUNetLib")
    }
    assert lib_imports == {"MedSegUNetLib.host.childprocess"}
    assert module_level_imports(module_tree("try:\n    import torch\nexcept ImportError:\n    pass")) & heavy == {
        "torch"
    }


def test_the_panel_reads_bundles_without_torch():
    """describeModel and segmentsToReplace read bundles in Slicer's own process: bundle.py must not need torch."""
    for name in (
        "model/bundle.py",
        "model/network.py",
        "core/atomic.py",
        "core/errors.py",
        "core/labels.py",
        "model/__init__.py",
        "core/__init__.py",
    ):
        assert (
            module_level_imports(ast.parse((ENGINE / name).read_text(encoding="utf-8"))) & {"torch", "monai", "numpy"}
            == set()
        ), name


def cmake_listed_files(cmake: str) -> Set[str]:
    return set(
        re.findall(
            r"(?:MedSegUNetLib|MedSegUNetMRML|MedSegUNetPanel|training)/(?:[A-Za-z0-9_]+/)*[A-Za-z0-9_]+\.py", cmake
        )
    )


def test_cmake_installs_every_engine_and_training_file_and_nothing_stale():
    cmake = (REPO / "MedSegUNet" / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "MedSegUNet")
    listed = cmake_listed_files(cmake)
    existing = {f"MedSegUNetLib/{p.relative_to(ENGINE).as_posix()}" for p in ENGINE.rglob("*.py")}
    existing |= {f"MedSegUNetMRML/{p.relative_to(NODE_WORK).as_posix()}" for p in NODE_WORK.rglob("*.py")}
    existing |= {f"MedSegUNetPanel/{p.relative_to(PANEL_TEXT).as_posix()}" for p in PANEL_TEXT.rglob("*.py")}
    existing |= {f"training/{p.relative_to(TRAINING).as_posix()}" for p in TRAINING.rglob("*.py")}
    assert existing - listed == set(), "not installed by MedSegUNet/CMakeLists.txt"
    assert listed - existing == set(), "listed in MedSegUNet/CMakeLists.txt but gone (the build would fail)"
    for resource in ("Resources/UI/MedSegUNet.ui", "Resources/Icons/MedSegUNet.png"):
        assert resource in cmake and (REPO / "MedSegUNet" / resource).is_file(), resource
    assert "slicer_add_python_unittest" in cmake and "Resources/Models/*.safetensors" in cmake
    assert cmake_listed_files(
        "MedSegUNetLib/new_file.py training/x.py MedSegUNetLib/core/y.py MedSegUNetLib/README.md"
    ) == {"MedSegUNetLib/new_file.py", "training/x.py", "MedSegUNetLib/core/y.py"}
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        'EXTENSION_DEPENDS "PyTorch"',
        "find_package(Slicer",
        "add_subdirectory(MedSegUNet)",
        "Slicer_EXTENSION_CPACK",
    ):
        assert field in top, field


def test_slicer_requirements_match_pyproject():
    """One list of version ranges: the panel installs exactly what pyproject.toml declares."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assignments = {dotted(n.targets[0]): n.value for n in module_tree().body if isinstance(n, ast.Assign)}
    listed = ast.literal_eval(assignments["ENGINE_REQUIREMENTS"]) + [ast.literal_eval(assignments["TORCH_REQUIREMENT"])]
    assert sorted(listed) == sorted(declared)


def test_module_icon_is_a_128_pixel_png():
    data = (REPO / "MedSegUNet" / "Resources" / "Icons" / "MedSegUNet.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# --- the extension's CMake, configured against a stand-in for Slicer ---------------------------------

STUB_SLICER_CONFIG = (
    r"""
# A stand-in for Slicer's build tree: the variables and macros the extension uses, with the same
# copying rules (scripts and resources land under qt-scripted-modules/ at their relative paths).
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "listed but missing: ${file}")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${file} """  # one CMake line, split to stay within 120 columns
    r"""${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${file} COPYONLY)
  endforeach()
  file(WRITE ${CMAKE_BINARY_DIR}/module-name.txt "${MY_NAME}")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "no such test script: ${MY_SCRIPT}")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/python-unittests.txt "${MY_SCRIPT}\n")
endfunction()
"""
)


@pytest.fixture(scope="module")
def configured_extension(tmp_path_factory):
    import shutil
    import subprocess

    if shutil.which("cmake") is None or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("cmake and a C++ compiler are needed to configure the extension")
    work = tmp_path_factory.mktemp("extension")
    stub = work / "Slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG, encoding="utf-8")
    (stub / "Empty.cmake").write_text("", encoding="utf-8")
    build = work / "build"
    result = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return build


def test_the_extension_configures_and_lays_out_the_module_as_installed(configured_extension):
    build = configured_extension
    modules = build / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    assert (build / "module-name.txt").read_text() == "MedSegUNet"
    assert (build / "python-unittests.txt").read_text().split() == ["MedSegUNet.py"]
    assert (modules / "MedSegUNet.py").is_file() and (modules / "Resources" / "UI" / "MedSegUNet.ui").is_file()
    for folder, name in (
        (ENGINE, "MedSegUNetLib"),
        (NODE_WORK, "MedSegUNetMRML"),
        (PANEL_TEXT, "MedSegUNetPanel"),
        (TRAINING, "training"),
    ):
        installed = modules / name
        assert {p.relative_to(folder) for p in folder.rglob("*.py")} == {
            p.relative_to(installed) for p in installed.rglob("*.py")
        }, name
    for bundle in list((REPO / "Resources" / "Models").glob("*.safetensors")) + list(
        (REPO / "MedSegUNet" / "Resources" / "Models").glob("*.safetensors")
    ):
        assert (modules / "Resources" / "Models" / bundle.name).is_file(), bundle.name


def test_the_installed_layout_runs_segment_and_train(configured_extension, tmp_path, small_bundle):
    """What Slicer runs from an installed extension: both packages found beside the module file alone."""
    import subprocess
    import sys

    from MedSegUNetLib.host.childprocess import engine_environment

    modules = configured_extension / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    environment = engine_environment(modules, base={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert environment["PYTHONPATH"] == str(modules.resolve())
    for command in (["-m", "MedSegUNetLib", "info", str(small_bundle)], ["-m", "training", "train", "--help"]):
        result = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
    check = subprocess.run(
        [sys.executable, "-c", "import MedSegUNetLib, training; print(MedSegUNetLib.__file__, training.__file__)"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=60,
    )
    paths = check.stdout.split()
    assert len(paths) == 2 and all(path.startswith(str(modules.resolve())) for path in paths), (
        check.stdout + check.stderr
    )

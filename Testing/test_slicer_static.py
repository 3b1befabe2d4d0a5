"""Static checks of the Slicer module against Slicer's real API (../shared/slicer-api), without Slicer.

MedSegUNet.py imports slicer, qt and vtk, which exist only inside Slicer, so it is read as source (ast).
Each checker is also run on a bad snippet, so that a checker that cannot fail is caught too.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ElementTree
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Set

import pytest

from conftest import REPO

MODULE_FILE = REPO / "MedSegUNet" / "MedSegUNet.py"
UI_FILE = REPO / "MedSegUNet" / "Resources" / "UI" / "MedSegUNet.ui"
API_FOLDER = REPO.parent / "shared" / "slicer-api"
API_VERSIONS = ["slicer_api_v5.8.1.json", "slicer_api_v5.12.3.json"]

# Qt 5 QtWidgets classes a .ui may use besides Slicer's own (the API file's ui_custom_widgets).
QT_WIDGETS = {
    "QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QComboBox", "QSpinBox",
    "QDoubleSpinBox", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QProgressBar", "QListWidget", "QTreeWidget",
    "QTableWidget", "QGroupBox", "QFrame", "QTabWidget", "QStackedWidget", "QScrollArea", "QSlider", "QSplitter",
    "QDialogButtonBox",
}


@lru_cache(maxsize=None)
def api(name: str) -> dict:
    path = API_FOLDER / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the shared Slicer API data must sit beside the repository")
    return json.loads(path.read_text(encoding="utf-8"))


def module_tree(source: str = None) -> ast.Module:
    return ast.parse(source if source is not None else MODULE_FILE.read_text(encoding="utf-8"))


# --- the checkers ----------------------------------------------------------------------------------


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def slicer_util_calls(tree: ast.Module) -> Dict[str, Set[str]]:
    """slicer.util function name -> keyword arguments used with it."""
    calls: Dict[str, Set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and dotted(node.func).startswith("slicer.util."):
            name = dotted(node.func).split(".")[2]
            calls.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
        elif isinstance(node, ast.Attribute) and dotted(node).startswith("slicer.util.") and dotted(node).count(".") == 2:
            calls.setdefault(node.attr, set())
    return calls


def unknown_util_calls(tree: ast.Module, data: dict) -> List[str]:
    functions = data["python"]["slicer.util"]["functions"]
    problems = []
    for name, keywords in slicer_util_calls(tree).items():
        if name not in functions:
            problems.append(f"slicer.util.{name}")
            continue
        parameters = functions[name]
        if not any(p.startswith("**") for p in parameters):
            problems += [f"slicer.util.{name}({k}=)" for k in keywords if k not in parameters]
    return problems


def imported_names(tree: ast.Module, module: str) -> Set[str]:
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == module for alias in node.names}


def vtk_method_names() -> Set[str]:
    """Methods VTK base classes give every MRML object (vtkObject, vtkCommand events ...), from the vtk package."""
    import vtk

    names: Set[str] = set()
    for cls in (vtk.vtkObject, vtk.vtkObjectBase, vtk.vtkCommand):
        names.update(n for n in dir(cls) if n[:1].isupper())
    return names


def mrml_method_names(data: dict) -> Set[str]:
    return {method for cls in data["mrml_classes"].values() for method in cls["methods"]}


def unknown_mrml_methods(tree: ast.Module, data: dict) -> List[str]:
    """Calls of CamelCase methods (VTK/MRML style; Qt's are camelCase) that no MRML or VTK class has."""
    known = mrml_method_names(data) | vtk_method_names()
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and not (isinstance(node.func.value, ast.Name) and node.func.value.id in modules)  # module.Class(): a constructor
    }
    return sorted(name for name in called if re.match(r"^[A-Z][a-z]", name) and name not in known)


def scene_class_names(tree: ast.Module) -> Set[str]:
    """Class names passed as strings to AddNewNodeByClass / CreateNodeByClass / getNodesByClass ..."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and "ByClass" in node.func.attr:
            names.update(a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str))
    names.update(n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and dotted(n).startswith("slicer.vtkMRML"))
    return names


def ui_widgets(ui_text: str) -> Dict[str, str]:
    root = ElementTree.fromstring(ui_text)
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_parameter_names(ui_text: str) -> Dict[str, str]:
    root = ElementTree.fromstring(ui_text)
    found = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = widget.get("name")
    return found


def ui_attributes_used(tree: ast.Module) -> Set[str]:
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and dotted(node.value) == "self.ui"}


def parameter_fields(tree: ast.Module) -> Set[str]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(dotted(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    return set()


def module_level_imports(tree: ast.Module) -> Set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Try):
            names.update(module_level_imports(ast.Module(body=node.body, type_ignores=[])))
    return names


# --- the checks on the module ----------------------------------------------------------------------


@pytest.mark.parametrize("version", API_VERSIONS)
def test_every_slicer_util_call_exists(version):
    assert unknown_util_calls(module_tree(), api(version)) == []
    assert unknown_util_calls(module_tree("slicer.util.loadVolumeFromSpace(1)\nslicer.util.loadUI(p, colour=1)"), api(version)) == [
        "slicer.util.loadVolumeFromSpace", "slicer.util.loadUI(colour=)"
    ]


@pytest.mark.parametrize("version", API_VERSIONS)
def test_parameter_node_wrapper_and_base_classes_exist(version):
    data = api(version)
    tree = module_tree()
    assert imported_names(tree, "slicer.parameterNodeWrapper") <= set(data["python"]["slicer.parameterNodeWrapper"]["names"])
    assert imported_names(tree, "slicer.ScriptedLoadableModule") <= set(data["python"]["slicer.ScriptedLoadableModule"]["classes"])
    assert {"parameterNodeWrapper", "WithinRange"} <= imported_names(tree, "slicer.parameterNodeWrapper")
    bad = module_tree("from slicer.parameterNodeWrapper import parameterNodeWrapperV2")
    assert not imported_names(bad, "slicer.parameterNodeWrapper") <= set(data["python"]["slicer.parameterNodeWrapper"]["names"])


@pytest.mark.parametrize("version", API_VERSIONS)
def test_every_mrml_method_and_node_class_exists(version):
    data = api(version)
    assert unknown_mrml_methods(module_tree(), data) == []
    snippet = "import tempfile\nnode.GetSegmentationz()\nnode.SetName('a')\nwidget.setText('x')\ntempfile.TemporaryDirectory()"
    assert unknown_mrml_methods(module_tree(snippet), data) == ["GetSegmentationz"]
    classes = scene_class_names(module_tree())
    assert {"vtkMRMLSegmentationNode", "vtkMRMLVolumeArchetypeStorageNode", "vtkMRMLSegmentationStorageNode"} <= classes
    assert classes <= set(data["mrml_classes"]), classes - set(data["mrml_classes"])


def test_every_ui_widget_class_is_qt_or_slicer():
    text = UI_FILE.read_text(encoding="utf-8")
    custom = set(api(API_VERSIONS[0])["ui_custom_widgets"])
    classes = set(ui_widgets(text).values())
    assert classes - QT_WIDGETS - custom == set()
    assert {"qMRMLNodeComboBox", "ctkCollapsibleButton"} <= classes
    assert {"qMRMLSegmentationEditorWidgetX"} - QT_WIDGETS - custom  # the check can fail


def test_every_widget_the_code_touches_is_in_the_ui():
    widgets = ui_widgets(UI_FILE.read_text(encoding="utf-8"))
    used = ui_attributes_used(module_tree())
    assert used, "the module touches no widget: the parser is broken"
    assert used - set(widgets) == set()
    assert ui_attributes_used(module_tree("self.ui.noSuchButton.enabled = True")) - set(widgets) == {"noSuchButton"}


def test_every_parameter_has_a_widget_and_every_bound_widget_a_parameter():
    text = UI_FILE.read_text(encoding="utf-8")
    fields = parameter_fields(module_tree())
    bound = ui_parameter_names(text)
    assert {"inputVolume", "outputSegmentation", "useTTA", "overlap"} <= fields
    assert fields == set(bound), (fields ^ set(bound))
    assert parameter_fields(module_tree("@parameterNodeWrapper\nclass P:\n    extra: int = 1\n")) == {"extra"}


def test_slicer_starts_without_torch_or_monai():
    """Neither the module nor what it imports at load time imports torch, MONAI or numpy-heavy engine parts."""
    heavy = {"torch", "monai", "SimpleITK", "numpy", "training"}
    assert module_level_imports(module_tree()) & heavy == set()
    childprocess = ast.parse((REPO / "MedSegUNet" / "MedSegUNetLib" / "childprocess.py").read_text(encoding="utf-8"))
    assert module_level_imports(childprocess) & heavy == set()
    package_init = ast.parse((REPO / "MedSegUNet" / "MedSegUNetLib" / "__init__.py").read_text(encoding="utf-8"))
    assert module_level_imports(package_init) & heavy == set()
    assert module_level_imports(module_tree("import torch")) & heavy == {"torch"}


def test_cmake_installs_every_engine_and_training_file():
    cmake = (REPO / "MedSegUNet" / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "MedSegUNet")
    for folder, prefix in ((REPO / "MedSegUNet" / "MedSegUNetLib", "MedSegUNetLib/"), (REPO / "training", "training/")):
        for path in sorted(folder.glob("*.py")):
            assert f"{prefix}{path.name}" in cmake, f"{prefix}{path.name} is not installed by MedSegUNet/CMakeLists.txt"
    assert "Resources/UI/MedSegUNet.ui" in cmake and "slicer_add_python_unittest" in cmake
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "add_subdirectory(MedSegUNet)"):
        assert field in top, field


def test_slicer_requirements_match_pyproject():
    """One list of version ranges: the panel installs exactly what pyproject.toml declares (torch aside)."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    tree = module_tree()
    listed = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and dotted(n.targets[0]) == "ENGINE_REQUIREMENTS")
    assert sorted(listed) == sorted(r for r in declared if not r.startswith("torch"))

"""The import layers of the engine and training, as docs/architecture.md draws them, checked on the source.

Every import counts, those inside functions too. The checker runs on the real tree and on a small bad
tree written by the test, so that a checker that cannot fail is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from conftest import REPO

ENGINE = REPO / "MedSegUNet" / "MedSegUNetLib"
TRAINING = REPO / "training"
NODE_WORK = REPO / "MedSegUNet" / "MedSegUNetMRML"  # the module's MRML glue: above the engine and training
PANEL_TEXT = REPO / "MedSegUNet" / "MedSegUNetPanel"  # the panel's Qt-free text helpers

# The engine's sub-packages, lowest first: a module may import its own layer and those below it.
ENGINE_LAYERS = ["core", "imageio", "model", "importers", "prediction", "commands", "cli", "__main__"]
# host/ (what the Slicer panel imports) stands apart: it may import nothing of the engine but the package.
STANDALONE = {"host"}
# What neither the engine nor training may import: they run outside Slicer, in a plain Python.
SLICER_ONLY = {"slicer", "qt", "ctk", "vtk", "vtkmrml", "vtkSegmentationCore", "mrml"}

Edge = Tuple[str, str, int]  # (importing module, imported project module, line)


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a (possibly relative) ``from ... import`` refers to."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str, path: Path, tree: ast.Module) -> List[Tuple[str, int]]:
    """Every module name an import statement anywhere in ``tree`` may load, with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, path.name == "__init__.py", node)
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]  # from pkg import module
    return found


def read_trees(packages: List[Tuple[Path, str]]) -> Dict[str, Tuple[Path, ast.Module]]:
    trees = {}
    for root, package in packages:
        for path in sorted(root.rglob("*.py")):
            trees[module_name(path, root, package)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return trees


def project_edges(trees: Dict[str, Tuple[Path, ast.Module]]) -> List[Edge]:
    """(importer, imported, line) between the project's own modules; a package's import counts as one of
    its ``__init__``."""
    edges = []
    for module, (path, tree) in trees.items():
        for name, line in imported_names(module, path, tree):
            if name in trees and name != module:
                edges.append((module, name, line))
    return edges


def engine_layer(module: str) -> Optional[str]:
    parts = module.split(".")
    return parts[1] if parts[0] == "MedSegUNetLib" and len(parts) > 1 else None


def layer_violations(edges: List[Edge]) -> List[str]:
    """One problem per import statement (``from pkg import module`` loads both)."""
    problems, seen = [], set()
    for importer, imported, line in edges:
        if (importer, line) in seen:
            continue
        before = len(problems)
        source, target = engine_layer(importer), engine_layer(imported)
        if importer.startswith("MedSegUNetLib") and imported.split(".")[0] == "training":
            problems.append(f"{importer}:{line} imports {imported}: the engine knows nothing of training")
        if importer.split(".")[0] in ("MedSegUNetLib", "training") and imported.startswith(
            ("MedSegUNetMRML", "MedSegUNetPanel")
        ):
            problems.append(f"{importer}:{line} imports {imported}: the engine and training know nothing of MRML")
        if source is None or target is None or imported == "MedSegUNetLib":
            continue
        if source in STANDALONE or target in STANDALONE:
            if source != target:
                problems.append(f"{importer}:{line} imports {imported}: {sorted(STANDALONE)} stands apart")
        elif ENGINE_LAYERS.index(target) > ENGINE_LAYERS.index(source):
            problems.append(f"{importer}:{line} imports {imported}, a higher layer ({source} < {target})")
        if len(problems) > before:
            seen.add((importer, line))
    return problems


def cycles(edges: List[Edge]) -> List[List[str]]:
    """The import cycles among the modules (strongly connected components of more than one module)."""
    graph: Dict[str, Set[str]] = {}
    for importer, imported, _ in edges:
        graph.setdefault(importer, set()).add(imported)
        graph.setdefault(imported, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def forbidden_imports(trees: Dict[str, Tuple[Path, ast.Module]]) -> List[str]:
    problems = []
    for module, (path, tree) in trees.items():
        for name, line in imported_names(module, path, tree):
            top = name.split(".")[0]
            if top in SLICER_ONLY and not module.startswith(("MedSegUNetMRML", "MedSegUNetPanel")):
                problems.append(f"{module}:{line} imports {name}: the engine and training never import Slicer or Qt")
            private = [part for part in name.split(".")[1:] if part.startswith("_") and not part.startswith("__")]
            if module.split(".")[0] != top and top in ("MedSegUNetLib", "training", "MedSegUNetMRML") and private:
                problems.append(f"{module}:{line} imports {name}, private to its package")
    return problems


def check(packages: List[Tuple[Path, str]]) -> List[str]:
    trees = read_trees(packages)
    edges = project_edges(trees)
    problems = layer_violations(edges) + forbidden_imports(trees)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return problems


def test_the_engine_and_training_keep_their_layers_with_no_cycles():
    packages = [(ENGINE, "MedSegUNetLib"), (TRAINING, "training"), (NODE_WORK, "MedSegUNetMRML")]
    assert check([*packages, (PANEL_TEXT, "MedSegUNetPanel")]) == []


def test_every_engine_module_sits_in_a_known_layer():
    trees = read_trees([(ENGINE, "MedSegUNetLib")])
    unplaced = [m for m in trees if m != "MedSegUNetLib" and engine_layer(m) not in ENGINE_LAYERS + sorted(STANDALONE)]
    assert unplaced == []


def test_training_builds_on_the_engine_and_is_not_flat_with_it():
    """training imports the engine (one way); the engine's program is composed into ``medsegunet`` there."""
    edges = project_edges(read_trees([(ENGINE, "MedSegUNetLib"), (TRAINING, "training")]))
    assert any(a.startswith("training") and b.startswith("MedSegUNetLib") for a, b, _ in edges)
    assert ("training.program", "MedSegUNetLib.cli") in {(a, b) for a, b, _ in edges}


def write_tree(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    engine, training = tmp_path / "MedSegUNetLib", tmp_path / "training"
    write_tree(
        engine,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/errors.py": "def f():\n    from MedSegUNetLib.model import bundle\n",  # up a layer, inside a function
            "model/__init__.py": "",
            # relative; the engine imports training
            "model/bundle.py": "from ..core import errors\nimport training.cli\n",
            "prediction/__init__.py": "",
            "prediction/a.py": "from .b import x\n",
            "prediction/b.py": "def g():\n    from MedSegUNetLib.prediction.a import y\nimport qt\n",  # a cycle; Qt
            "host/__init__.py": "",
            "host/childprocess.py": "from MedSegUNetLib.core.errors import E\n",
        },
    )
    write_tree(
        training,
        {
            "__init__.py": "",
            "cli.py": "from MedSegUNetLib.core.errors import _private\n",
            "loop.py": "import MedSegUNetMRML.segments\n",
        },
    )
    write_tree(tmp_path / "MedSegUNetMRML", {"__init__.py": "", "segments.py": "import slicer\n"})
    problems = check(
        [(engine, "MedSegUNetLib"), (training, "training"), (tmp_path / "MedSegUNetMRML", "MedSegUNetMRML")]
    )
    expected = [
        "MedSegUNetLib.core.errors:2 imports MedSegUNetLib.model, a higher layer",
        "MedSegUNetLib.model.bundle:2 imports training.cli: the engine knows nothing of training",
        "MedSegUNetLib.host.childprocess:1 imports MedSegUNetLib.core.errors",
        "MedSegUNetLib.prediction.b:3 imports qt",
        "training.cli:1 imports MedSegUNetLib.core.errors._private, private",
        "import cycle: MedSegUNetLib.prediction.a -> MedSegUNetLib.prediction.b",
        "import cycle: MedSegUNetLib.core.errors -> MedSegUNetLib.model.bundle -> training.cli",
        "training.loop:1 imports MedSegUNetMRML.segments: the engine and training know nothing of MRML",
    ]
    for text in expected:
        assert any(problem.startswith(text) for problem in problems), (text, problems)
    assert len(problems) == len(expected), problems

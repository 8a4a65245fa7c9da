"""The floor plan: one installed name (``factedit``), imports that only run down the layers, no
import cycles, and a library that works from a research folder with packages of the same names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from factedit import SUBPACKAGES

# layer -> the layers it must never import (the leaf, factedit/*.py, imports none of them)
FORBIDDEN = {
    "leaf": set(SUBPACKAGES),
    "metrics": {"editors", "datamodules", "lit_modules", "evaluation"},
    "editors": {"datamodules", "lit_modules", "evaluation"},
    "datamodules": {"lit_modules", "evaluation"},
    "lit_modules": {"evaluation"},
}


def _library_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module installed under factedit."""
    found = {}
    for folder, prefix in [(ROOT / "factedit", "factedit"), *((ROOT / name, f"factedit.{name}") for name in SUBPACKAGES)]:
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join([prefix, *(parts[:-1] if package else parts)])] = (path, package)
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skipped


def _imports(path: Path, module: str, package: bool) -> list[tuple[str, int]]:
    """Absolute names of everything ``path`` imports at run time (module level and in functions)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    base = module if package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                origin = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.append((origin, node.lineno))
            names += [(f"{origin}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _layer(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else ""
    return part if part in SUBPACKAGES else "leaf"


def test_the_package_list_names_every_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"factedit.{name}": name for name in SUBPACKAGES}
    listed = set(config["packages"])
    on_disk = {name for name, (_, package) in _library_modules().items() if package}
    assert listed == on_disk


def test_no_file_imports_a_folder_by_its_own_name():
    """From a checkout, ``import editors`` would load a second copy of the library beside
    ``factedit.editors``: every import in the project goes through factedit."""
    files = [*ROOT.glob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    files += [path for path, _ in _library_modules().values()]
    bare = set(SUBPACKAGES) | {"edit", "train"}
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for name, line in _imports(path, "x", False)
        if name.split(".")[0] in bare
    ]
    assert not wrong, "\n".join(wrong)


def test_imports_run_down_the_layers_only():
    modules = _library_modules()
    wrong = []
    for module, (path, package) in sorted(modules.items()):
        for name, line in _imports(path, module, package):
            if name in modules and _layer(name) in FORBIDDEN.get(_layer(module), ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({_layer(module)}) imports {name} ({_layer(name)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """No two modules import each other, directly or through others, at module level or inside
    functions (imports under ``if TYPE_CHECKING:`` do not run and do not count)."""
    modules = _library_modules()
    graph = {m: {n for n, _ in _imports(p, m, pkg) if n in modules and n != m and not m.startswith(n + ".")} for m, (p, pkg) in modules.items()}
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target) :] + [module, target] if target in trail else [module, target])
            elif target not in state:
                visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_library_imports_from_a_folder_with_packages_of_the_same_names(tmp_path):
    """A research project with its own metrics/, evaluation/ and editors/ packages (each of which
    fails loudly when imported) can still use the library."""
    for name in ("metrics", "evaluation", "editors"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the project folder {name} was imported')\n")
    code = (
        "from factedit.evaluation.report import summary_table\n"
        "from factedit.editors import get_editor, EditRequest, Edit\n"
        "from factedit.models import load_model\n"
        "import factedit.metrics, factedit.datamodules, factedit.evaluation.cli\n"
        "print(get_editor('rome').__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ROME"]


def test_a_folder_imported_by_its_own_name_is_refused():
    result = subprocess.run([sys.executable, "-c", "import editors"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "import factedit.editors, not editors" in result.stderr


def test_a_built_wheel_installs_one_name(tmp_path):
    """The wheel's top-level entries: the package and its metadata, nothing else (no ``edit``,
    ``train`` or the folders' own names), and the demo data inside the package."""
    pytest.importorskip("setuptools", reason="building a wheel without network needs setuptools installed")
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("factedit", *SUBPACKAGES):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("factedit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {name for name in top if not name.endswith(".dist-info")} == {"factedit"} and len(top) == 2
    assert "factedit/editors/rome/editor.py" in names and "factedit/datamodules/demo/demo_counterfact.json" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "factedit-edit = factedit.evaluation.cli:run" in entry_points


def test_tests_mirror_the_packages_and_share_only_helpers():
    """Test folders are named after the packages; a test module imports no other test module
    (shared builders live in ``tests/helpers``), and ``conftest.py`` holds fixtures only."""
    tests = ROOT / "tests"
    folders = {path.name for path in tests.iterdir() if path.is_dir() and not path.name.startswith((".", "__"))}
    assert folders <= set(SUBPACKAGES) | {"helpers"}
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in tests.rglob("*.py")
        for name, line in _imports(path, "x", False)
        if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"
    ]
    assert not wrong, "\n".join(wrong)
    conftest = ast.parse((tests / "conftest.py").read_text())
    functions = [node for node in conftest.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert functions and all(
        isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list) for node in functions
    ), [node.name for node in functions]


def test_the_editors_machinery_imports_no_method_and_registers_nothing():
    from factedit.editors.registry import METHODS

    methods = {module.rsplit(".", 1)[0] for module, _ in METHODS.values()}  # factedit.editors.<method>
    methods = {name if name.count(".") == 2 else name.rsplit(".", 1)[0] for name in methods}
    modules = _library_modules()
    wrong = []
    for module, (path, package) in sorted(modules.items()):
        if not module.startswith("factedit.editors.core"):
            continue
        wrong += [f"{path.relative_to(ROOT)}:{line} imports {name}" for name, line in _imports(path, module, package) if any(name == m or name.startswith(m + ".") for m in methods)]
        wrong += [f"{path.relative_to(ROOT)} registers an editor" for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name) and node.id == "register_editor"]
    assert methods >= {"factedit.editors.rome", "factedit.editors.t_patcher", "factedit.editors.memit"}
    assert not wrong, "\n".join(wrong)


def test_every_method_package_is_named_as_registered():
    from factedit.editors.registry import METHODS

    for name, method in METHODS.items():
        package = method.module.split(".")[2]
        assert package == name or name in ("ft_l", "ft_m", "pmet", "alphaedit"), (name, method.module)
        assert (ROOT / "editors" / package / "__init__.py").is_file()


def test_an_editor_is_one_package(tmp_path, monkeypatch):
    """The registry finds methods in the packages of the editors folder: a new method is a new
    package whose config names what it registers; no other module changes."""
    from factedit.editors.registry import METHODS, find_methods

    root = tmp_path / "probe_editors"
    (root / "core").mkdir(parents=True)
    (root / "core" / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "mine").mkdir()
    (root / "mine" / "__init__.py").write_text("")
    (root / "mine" / "config.py").write_text(
        "from dataclasses import dataclass\n"
        "from factedit.editors.config import EditorConfig\n\n"
        "@dataclass\nclass MineConfig(EditorConfig):\n    strength: float = 1.0\n\n"
        "REGISTERS = {'mine': ('editor', 'MineConfig')}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find_methods(root, "probe_editors")
    assert list(found) == ["mine"] and found["mine"].module == "probe_editors.mine.editor"
    assert found["mine"].config == "probe_editors.mine.config:MineConfig"
    assert find_methods() == dict(METHODS) and len(METHODS) == 16

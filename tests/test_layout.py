"""The package layout stays what DESIGN.md and `.importlinter` say: stages in layers, no import circle
(imports inside functions included), no private name imported across packages, small modules, a
short top level, and the 0.2 module paths still importable."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "clipdet"
MAX_LINES = 450
MAX_TOP_MODULES = 14


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every clipdet import in `path`, at any depth."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "clipdet" or mod.startswith("clipdet."):
                out += [(mod, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("clipdet")]
    return out


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"lint-imports not found beside {sys.executable}: install the dev extra (import-linter)")
    return subprocess.run([str(exe), "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_import_linter_contracts_hold():
    r = _lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout, r.stdout


def test_import_linter_catches_a_layer_violation_and_a_circle(tmp_path):
    """The contracts bite: a lower stage importing a higher one (lazily) and a circle both break them."""
    shutil.copytree(PKG, tmp_path / "clipdet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    cache_model = tmp_path / "clipdet" / "cache" / "model.py"
    cache_model.write_text(cache_model.read_text() + "\n\ndef _up():\n    from ..fit import fit  # noqa: F401\n")
    shots = tmp_path / "clipdet" / "fit" / "shots.py"
    shots.write_text(shots.read_text() + "\n\ndef _round():\n    from .run import fit  # noqa: F401\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0
    assert "clipdet.cache.model -> clipdet.fit" in r.stdout, r.stdout
    assert "BROKEN" in r.stdout and "2 kept" not in r.stdout
    assert "- .shots -> .run" in r.stdout  # the circle fit.run -> fit.shots -> fit.run is named


def test_no_import_circle_anywhere():
    """No circle in the whole module graph, lazy imports and package __init__ files included."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for mod, name, _ in _imports(m, p):
            target = f"{mod}.{name}" if f"{mod}.{name}" in mods else mod
            if target in mods and target != m:
                graph[m].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    assert circles == []


def _package(module: str, is_pkg: bool) -> str:
    parts = module.split(".")
    return ".".join(parts if is_pkg else parts[:-1])


def test_no_private_name_imported_across_packages():
    mods = _modules()
    found = []
    for m, p in mods.items():
        mine = _package(m, p.name == "__init__.py")
        for mod, name, line in _imports(m, p):
            if f"{mod}.{name}" in mods:  # a module: it belongs to the package it is imported from
                theirs = mod
            else:
                theirs = _package(mod, mod in mods and mods[mod].name == "__init__.py")
            private = name.startswith("_") and not name.startswith("__")
            if private and theirs != mine:
                found.append(f"{p.relative_to(REPO)}:{line} imports {name} from {mod}")
    assert found == []


def test_modules_are_small_and_the_top_level_is_short():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    long = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert long == {}
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_importing_clipdet_and_its_cli_loads_no_heavy_library():
    """`clipdet --help` stays instant: the package and the CLI import no model, array-store or ML library
    until a command needs it (heads are registered on first use, torch and h5py inside functions)."""
    heavy = ("torch", "sklearn", "scipy", "h5py", "open_clip", "faiss", "ray", "fastapi", "matplotlib", "pyarrow",
             "PIL")
    code = f"import sys, clipdet, clipdet.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_package_says_what_it_owns():
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(REPO)} has no docstring saying what the package owns"


def test_old_module_paths_still_import():
    """Every 0.2 path in clipdet._compat.MOVED imports (with a DeprecationWarning) and finds its old names."""
    from clipdet import _compat

    samples = {"clipdet.images": ["discover", "decode_image", "parse_views", "ImageRef"],
               "clipdet.fewshot": ["fit", "fit_from_pool", "Pool", "sample_shots", "parse_shots"],
               "clipdet.features": ["matrix", "read_plan", "group_layout", "kinds_for"],
               "clipdet.protocols": ["run_bench", "kshot_curve", "versions", "format_shortcut"],
               "clipdet.scoring": ["score_refs", "RowWriter", "COLUMNS"],
               "clipdet.detector": ["Detector"], "clipdet.metrics": ["roc_auc", "mean_ci"],
               "clipdet.engine": ["check_engine"], "clipdet.engine.ray_driver": ["extract_on_ray"]}
    for old, targets in _compat.MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            mod = importlib.import_module(old)
        assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in seen), old
        for target in targets:
            importlib.import_module(target)
        for name in samples.get(old, []):
            new = next(getattr(importlib.import_module(t), name) for t in targets
                       if hasattr(importlib.import_module(t), name))
            assert getattr(mod, name) is new, (old, name)
    with pytest.raises(AttributeError, match="moved to"):
        _ = importlib.import_module("clipdet.images").no_such_name


def test_readme_library_api_keeps_working(tmp_path):
    """The names README's Library section shows resolve, old and new."""
    import clipdet
    from clipdet.extract import discover as new_discover
    from clipdet.finetune import finetune  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from clipdet.features import matrix
        from clipdet.images import discover
    assert discover is new_discover is clipdet.discover
    assert matrix is importlib.import_module("clipdet.detectors.features").matrix
    assert clipdet.Detector is importlib.import_module("clipdet.detectors").Detector
    assert callable(clipdet.fit) and callable(clipdet.extract) and callable(clipdet.score_paths)
    assert hasattr(clipdet.Detector, "score_paths") and callable(clipdet.cache.read_plain)

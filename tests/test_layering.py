"""The layering docs/architecture.md draws, checked on the imports themselves: no core module imports an
adapter, the zoo or a pass; no pass imports another pass."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Entry points and the package init may import anything: they compose the layers.
COMPOSERS = {"__init__.py", "__main__.py", "cli.py", "demo.py", "api.py"}
ADAPTERS = {"e2cnn_adapter.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _core_files() -> list[Path]:
    files = [p for p in (ROOT / "fxslim").rglob("*.py") if "zoo" not in p.relative_to(ROOT / "fxslim").parts]
    return [p for p in files if p.name not in COMPOSERS | ADAPTERS or p.parent.name != "fxslim"]


def test_core_modules_import_no_adapter_zoo_or_pass() -> None:
    files = _core_files()
    assert len(files) > 30  # the walk found the core
    bad = {}
    for path in files:
        found = sorted(
            n for n in _imports(path)
            # the registry (recipe.py) lists the package fxslim.passes; importing a pass module is what counts
            if n.startswith(("fxslim.zoo", "fxslim.passes.", "fxslim.e2cnn_adapter"))
        )
        if found:
            bad[str(path.relative_to(ROOT))] = found
    assert bad == {}


def test_no_pass_imports_another_pass() -> None:
    passes = sorted(p for p in (ROOT / "passes").glob("*.py") if p.name != "__init__.py")
    assert len(passes) == 12
    bad = {p.name: sorted(n for n in _imports(p) if n.startswith("fxslim.passes")) for p in passes}
    assert {k: v for k, v in bad.items() if v} == {}

"""The floors of the package: evaluation and training stand on the core, never on the app,
and training never on the evaluation (README, Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moshivis_mlx"


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` imports, as absolute names (relative imports resolved)."""
    package = ["moshivis_mlx", *path.relative_to(PACKAGE).parent.parts]
    found: set[str] = set()
    source = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("floor, forbidden", [
    ("eval", ("moshivis_mlx.app",)),
    ("train", ("moshivis_mlx.app", "moshivis_mlx.eval")),
])
def test_floor_imports_nothing_above_it(floor, forbidden):
    bad = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in sorted((PACKAGE / floor).rglob("*.py"))
        for module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    )
    assert not bad, "\n".join(bad)


def test_walker_sees_relative_and_absolute_imports():
    # The walker itself must catch both spellings, or the test above could never fail.
    found = imported_modules(PACKAGE / "train" / "probe.py",
                             "def f():\n    from ..app import ui\nimport moshivis_mlx.eval.run\n")
    assert "moshivis_mlx.app.ui" in found and "moshivis_mlx.eval.run" in found

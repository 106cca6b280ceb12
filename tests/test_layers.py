"""The house's floors: cli -> callbacks/datamodules -> lightning_modules -> components. A lower
floor never imports a higher one at module level (a model may add its own callback lazily in
``configure_callbacks``; annotations may name data types under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE = {  # package -> packages it must not import at module level
    "lightning_modules/components": ("cli", "callbacks", "datamodules", "lightning_modules."
                                     "dual_tokenizer", "lightning_modules.generative_recommender",
                                     "lightning_modules.preference_aligner",
                                     "lightning_modules.sasrec"),
    "lightning_modules": ("cli", "callbacks", "datamodules"),
    "datamodules": ("cli", "callbacks"),
    "callbacks": ("cli",),
}


def _module_level_imports(path: Path):
    """Imported module names outside functions and outside ``if TYPE_CHECKING:`` blocks."""
    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield node.module
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                yield from walk(ast.iter_child_nodes(node))
    yield from walk(ast.parse(path.read_text()).body)


def _files():
    for folder in ABOVE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield pytest.param(path, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize("path", list(_files()))
def test_no_module_level_import_from_a_higher_floor(path):
    rel = path.relative_to(ROOT).as_posix()
    floor = max((f for f in ABOVE if rel.startswith(f + "/")), key=len)
    bad = [m for m in _module_level_imports(path)
           if any(m == b or m.startswith(b + ".") for b in ABOVE[floor])]
    assert not bad, f"{rel} imports {bad} from a higher floor"


def test_the_scan_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from datamodules.schema import RecDataset\n"
                   "from datamodules.preference_data import NEGATIVE_KINDS\n"
                   "def f():\n    import cli\n")
    assert list(_module_level_imports(bad)) == ["typing", "datamodules.preference_data"]

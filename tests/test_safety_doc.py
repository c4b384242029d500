"""docs/safety.md lists every invariant, in order, and every test it names exists."""

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "safety.md"


@functools.cache  # the doc names many tests per file: parse each file once
def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_invariants_are_numbered_one_to_nineteen_in_order():
    numbers = [int(m) for m in re.findall(r"^## (\d+)\. ", DOC.read_text(), re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 19


def test_every_named_test_exists():
    missing = []
    for file, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", DOC.read_text()):
        path = ROOT / file
        if not path.is_file() or name not in _test_names(path):
            missing.append(f"{file}::{name}")
    assert missing == [], f"docs/safety.md names tests that do not exist: {missing}"

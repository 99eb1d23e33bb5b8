"""docs/promises.md names the test behind each promise: every named test exists (a renamed or deleted test
would leave a promise without its backing)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_named_in_promises_exists():
    text = (ROOT / "docs" / "promises.md").read_text()
    named, missing = 0, []
    for cell in re.findall(r"`[^`]+`(?:, `[^`]+`)*", text):
        current = None
        for ref in re.findall(r"`([^`]+)`", cell):
            m = re.fullmatch(r"(?:(test_\w+\.py))?(?:::(test_\w+))?", ref)
            if not m or not (m.group(1) or m.group(2)):
                continue
            current = m.group(1) or current
            if current is None:
                continue
            path = ROOT / "tests" / current
            if not path.is_file():
                missing.append(current)
                continue
            if m.group(2):
                named += 1
                if m.group(2) not in _tests_in(path):
                    missing.append(f"{current}::{m.group(2)}")
    assert named >= 40 and not missing, missing

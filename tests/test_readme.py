"""The README's quick start is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = _quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "examples/quickstart.yaml" in commands[0]


def test_quickstart_slide_is_shipped():
    assert (ROOT / "examples" / "data" / "CMU-1-Small-Region.svs").stat().st_size == 1_938_955  # PROVENANCE.md


def test_test_data_paths_named_in_docs_exist():
    """The Development paragraph and the example-data README point at files that are really in the repository."""
    readme = (ROOT / "README.md").read_text()
    dev = readme.split("## Development", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`((?:tests|examples)/[^`]+)`", dev)
    assert {"examples/data/", "tests/data/", "tests/data/PROVENANCE.md", "tests/conftest.py"} <= set(named)
    assert all((ROOT / n).exists() for n in named), named
    data_readme = ROOT / "examples" / "data" / "README.md"
    links = re.findall(r"\]\(([^)]+)\)", data_readme.read_text())
    assert "../../tests/data/PROVENANCE.md" in links
    assert all((data_readme.parent / link).resolve().is_file() for link in links)
    for doc in [ROOT / "README.md", data_readme, *sorted((ROOT / "docs").glob("*.md"))]:
        assert "shared/data" not in doc.read_text(), doc  # the development workspace's folder is not shipped

"""The distribution installs beside the official prov-gigapath package (issue #17 item 1).

The official package (github.com/prov-gigapath/prov-gigapath, pyproject.toml) is the distribution ``gigapath``
with the import package ``gigapath`` and no console script; TRIDENT's and STAMP's GigaPath extras install it.
Ours is ``gigapath-core`` (import packages ``gigapath_core`` + ``gigapath_plugins``, console script ``gigapath``),
so pip never treats one as an upgrade of the other.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]


def _installed() -> set[str]:
    return {(d.metadata["Name"] or "").lower() for d in md.distributions()}


def _installed_root(cwd: Path) -> Path:
    """The project folder the venv's editable ``gigapath-core`` points at. Reinstalling from there (not from this
    checkout) leaves a venv shared by several checkouts (git worktrees, PYTHONPATH) pointing where it did."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import gigapath_core, pathlib; "
                            "print(pathlib.Path(gigapath_core.__file__).resolve().parents[1])"],
                           capture_output=True, text=True, env=env, cwd=cwd)
    root = Path(probe.stdout.strip()) if probe.returncode == 0 else ROOT
    return root if (root / "pyproject.toml").is_file() else ROOT


def _fake_official(root: Path) -> Path:
    """A package laid out like the official one: distribution ``gigapath``, module ``gigapath``."""
    (root / "gigapath").mkdir(parents=True)
    (root / "gigapath" / "__init__.py").write_text("OFFICIAL = True\n")
    (root / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61.0"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "gigapath"
        version = "0.1.0"
        [tool.setuptools.packages.find]
        include = ["gigapath"]
    """))
    return root


def test_our_distribution_is_not_named_like_the_official_one():
    assert md.distribution("gigapath-core").metadata["Name"] == "gigapath-core"
    assert md.distribution("gigapath-plugins").requires == ["gigapath-core"]
    names = {ep.name for ep in md.distribution("gigapath-core").entry_points if ep.group == "console_scripts"}
    assert names == {"gigapath"}  # a console script; the official package has none and no module of that name


@pytest.mark.skipif("gigapath" in _installed(), reason="a distribution named 'gigapath' is already installed here")
def test_official_package_and_ours_stay_installed_together(tmp_path):
    fake = _fake_official(tmp_path / "official")
    ours = _installed_root(tmp_path)
    try:
        subprocess.run(PIP + [str(fake)], check=True)
        assert {"gigapath", "gigapath-core", "gigapath-plugins"} <= _installed()
        # the other order: (re)installing ours leaves the official one in place
        subprocess.run(PIP + ["-e", str(ours)], check=True)
        assert {"gigapath", "gigapath-core", "gigapath-plugins"} <= _installed()
        probe = subprocess.run(
            [sys.executable, "-c", "import gigapath, gigapath_core, gigapath_plugins; print(gigapath.OFFICIAL)"],
            capture_output=True, text=True, check=True, cwd=tmp_path)
        assert probe.stdout.strip() == "True"
        cli = subprocess.run([Path(sys.executable).with_name("gigapath"), "plugins", "--kind", "tiler"],
                             capture_output=True, text=True, check=True)
        assert "otsu" in cli.stdout
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "gigapath"], check=False)
    assert "gigapath" not in _installed() and "gigapath-core" in _installed()

"""Shared fixtures. Real slides come from the repository through the ``shared_data`` fixture: the slides in
``examples/data/`` and the files in ``tests/data/`` (provenance and licences in ``tests/data/PROVENANCE.md``), laid
out as ``slides/``, ``bad-slides/``, ``reference/``. ``GIGAPATH_SHARED=DIR`` uses ``DIR/data`` (same layout) instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / "tests" / "data"
EXAMPLE_SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"

os.environ.setdefault("GIGAPATH_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """A folder with ``slides/`` (examples/data + tests/data/slides), ``bad-slides/`` and ``reference/``."""
    if os.environ.get("GIGAPATH_SHARED"):
        folder = Path(os.environ["GIGAPATH_SHARED"]) / "data"
        assert folder.is_dir(), f"GIGAPATH_SHARED is set but {folder} is not a folder"
        return folder
    view = tmp_path_factory.mktemp("test-data")
    (view / "slides").mkdir()
    for p in sorted((ROOT / "examples" / "data").iterdir()):
        if p.suffix in (".svs", ".tif", ".tiff"):
            (view / "slides" / p.name).symlink_to(p)
    for p in sorted((TEST_DATA / "slides").iterdir()):
        (view / "slides" / p.name).symlink_to(p, target_is_directory=p.is_dir())
    for name in ("bad-slides", "reference"):
        (view / name).symlink_to(TEST_DATA / name, target_is_directory=True)
    return view


@pytest.fixture(scope="session")
def example_slide() -> Path:
    """The CC0 slide shipped in the repo (CMU-1-Small-Region.svs, 2220x2967, mpp 0.499)."""
    assert EXAMPLE_SLIDE.is_file(), EXAMPLE_SLIDE
    return EXAMPLE_SLIDE

"""Shared fixtures. Real slides come from ``../shared/data`` through the ``shared_data`` fixture only:
under CI (``CI=true``) a missing folder is a failure, elsewhere the test is skipped with a clear reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GIGAPATH_SHARED", ROOT.parent / "shared")) / "data"
EXAMPLE_SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"

os.environ.setdefault("GIGAPATH_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (slides/, bad-slides/, reference/)."""
    if not SHARED.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared test data folder is missing: {SHARED}")
        pytest.skip(f"shared test data not found at {SHARED} (set GIGAPATH_SHARED to its parent folder)")
    return SHARED


@pytest.fixture(scope="session")
def example_slide() -> Path:
    """The CC0 slide shipped in the repo (CMU-1-Small-Region.svs, 2220x2967, mpp 0.499)."""
    assert EXAMPLE_SLIDE.is_file(), EXAMPLE_SLIDE
    return EXAMPLE_SLIDE

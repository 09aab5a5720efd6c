from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Two cores on CI: keep torch from oversubscribing them when several workers run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _shared_fixtures() -> Path:
    env = os.environ.get("MEDVL_FIXTURES")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """Real files beside the checkout: RG1_J2KI.dcm (chest CR, MONOCHROME1, JPEG 2000) and two NIH PNGs."""
    path = _shared_fixtures()
    if not (path / "RG1_J2KI.dcm").exists():
        pytest.fail(f"real fixtures not found at {path}; set MEDVL_FIXTURES to the folder holding RG1_J2KI.dcm")
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A 48-image, 64 px prepared dataset with template reports (see tests/toydata.py)."""
    from tests.toydata import make_tiny_prepared

    return make_tiny_prepared(tmp_path_factory.mktemp("tiny_prepared"))

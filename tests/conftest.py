"""Shared test helpers: the real-file and tiny-dataset fixtures, :func:`one_thread` (and the ``single_thread``
fixture that puts a whole test module on one torch thread), and the tiny AdaMatch run several test folders build
on (``tiny_adamatch_run``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Two cores on CI: keep torch from oversubscribing them when several workers run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and much faster when the cores are shared: OpenMP threads
    spin-waiting on each other made each small convolution ~30x slower under load, and a 60-step tiny
    training 12x slower (13 s vs 1.1 s wall) with 2 threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """The whole test module on one torch thread (:func:`one_thread`); a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


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
        pytest.fail(
            f"real fixtures not found at {path}; set MEDVL_FIXTURES to the folder holding RG1_J2KI.dcm"
        )
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A 48-image, 64 px prepared dataset with template reports (see tests/toydata.py)."""
    from tests.toydata import make_tiny_prepared

    return make_tiny_prepared(tmp_path_factory.mktemp("tiny_prepared"))


@pytest.fixture(scope="session")
def tiny_adamatch_run(tiny_prepared, tmp_path_factory) -> Path:
    """A finished AdaMatch run on ``tiny_prepared``: the tiny preset trained a few steps
    (:func:`tests.models.adamatch_fixtures.train_tiny_run`), built once per test session."""
    from tests.models.adamatch_fixtures import train_tiny_run

    with one_thread():
        run = train_tiny_run(tiny_prepared, tmp_path_factory.mktemp("tiny_adamatch") / "run")
    (run / "stage.json").write_text(json.dumps({"stage": "adamatch"}))
    return run

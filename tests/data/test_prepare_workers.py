"""Preparation with worker processes when one of them dies: an image whose decoding ends its worker (a codec's
crash, the system's out-of-memory kill) is found, given up with the reason and tried again by a rerun; the rest
of its chunk is kept, a worker that dies once is replaced, and nothing waits for ever."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import medvl.data.ingest as ingest
from medvl.data.testing import write_mimic_tree
from medvl.data.workers import exit_text

SIZE = 32
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from prepare_scale import _children  # noqa: E402  (the process tree from /proc)

# the stand-in decoders below are patched into the parent and reach the workers by fork
pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    spec = write_mimic_tree(tmp_path_factory.mktemp("tree"), image_format="mixed")
    found = sorted(str(p) for p in spec.root.glob("files/**/*") if p.suffix in (".jpg", ".dcm"))
    assert len(found) >= 6
    return found[:6]


@pytest.fixture(autouse=True)
def no_hang():
    faulthandler.dump_traceback_later(120, exit=True)  # a lost result would otherwise wait for ever
    yield
    faulthandler.cancel_dump_traceback_later()


def cache(out: Path, paths: list[str], workers: int = 2):
    outcomes, decoded, reused = ingest.build_image_cache(out, paths, size=SIZE, workers=workers, chunk_size=3)
    return outcomes, decoded, reused, np.load(out / "images.npy")


def test_an_image_that_crashes_its_worker_is_given_up_and_the_rest_kept(paths, tmp_path, monkeypatch):
    ref_outcomes, *_, reference = cache(tmp_path / "reference", paths, workers=1)
    real, bad = ingest._read_and_resize, paths[4]

    def crashing(path, *args):
        if path == bad:
            faulthandler.disable()  # (no traceback printed by the test run's handler)
            os.kill(os.getpid(), signal.SIGSEGV)  # as a codec's C code would
        return real(path, *args)

    monkeypatch.setattr(ingest, "_read_and_resize", crashing)
    out = tmp_path / "out"
    outcomes, decoded, _, images = cache(out, paths)
    assert decoded == 6
    assert not outcomes[4].ok and "ended its worker process (crashed with SIGSEGV)" in outcomes[4].reason
    assert ingest.reason_kind(outcomes[4].reason) == ingest.ENDED_WORKER
    for row in (0, 1, 2, 3, 5):  # the other image of its chunk too
        assert outcomes[row] == ref_outcomes[row], row
        np.testing.assert_array_equal(images[row], reference[row])
    # the chunk holding it leaves no marker, so a rerun tries that chunk again, and only it
    markers = sorted(p.name for p in (out / ".prepare").glob("chunk_*.json"))
    assert markers == ["chunk_0000000.json"]
    monkeypatch.setattr(ingest, "_read_and_resize", real)
    outcomes, decoded, reused, images = cache(out, paths)
    assert (decoded, reused) == (3, 3) and outcomes == ref_outcomes
    np.testing.assert_array_equal(images, reference)


def test_a_worker_killed_once_is_replaced_and_nothing_is_lost(paths, tmp_path, monkeypatch):
    ref_outcomes, *_, reference = cache(tmp_path / "reference", paths, workers=1)
    real, flag = ingest._read_and_resize, tmp_path / "killed-once"

    def killed_once(path, *args):
        if path == paths[1] and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # as the system does when memory runs out
        return real(path, *args)

    monkeypatch.setattr(ingest, "_read_and_resize", killed_once)
    out = tmp_path / "out"
    outcomes, decoded, _, images = cache(out, paths)
    assert flag.exists() and decoded == 6 and outcomes == ref_outcomes
    np.testing.assert_array_equal(images, reference)
    assert len(list((out / ".prepare").glob("chunk_*.json"))) == 2


def test_exit_text_names_the_signal():
    assert exit_text(-signal.SIGKILL).startswith("killed by SIGKILL: most often")
    assert exit_text(-signal.SIGSEGV) == "crashed with SIGSEGV"
    assert exit_text(3) == "exited with code 3"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_workers_do_not_outlive_a_killed_parent(paths, tmp_path):
    """The parent killed outright (no clean-up runs): its workers notice and end within seconds."""
    script = (
        "import sys, time\n"
        "import medvl.data.ingest as ingest\n"
        "ingest._read_and_resize = lambda *a: time.sleep(600)\n"
        "print('go', flush=True)\n"
        f"ingest.build_image_cache({str(tmp_path / 'out')!r}, {paths!r}, size=32, workers=2, chunk_size=3)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "go"
        deadline = time.monotonic() + 60
        while len(workers := _children().get(parent.pid, [])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "workers outlived their parent"


def test_prepare_lists_the_image_and_says_a_rerun_tries_it_again(tmp_path, monkeypatch):
    from medvl.data.mimic import prepare_mimic

    spec = write_mimic_tree(tmp_path / "tree", image_format="jpg")
    real = ingest._read_and_resize
    bad = str(spec.root / spec.path(spec.images[0]))

    def crashing(path, *args):
        if path == bad:
            faulthandler.disable()
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path, *args)

    monkeypatch.setattr(ingest, "_read_and_resize", crashing)
    result = prepare_mimic(spec.root, tmp_path / "out", size=SIZE, workers=2)
    skipped = (tmp_path / "out" / "skipped.csv").read_text()
    assert (
        f"{spec.path(spec.images[0])},decoding it ended its worker process (crashed with SIGSEGV)" in skipped
    )
    assert result.skipped_by_reason[ingest.ENDED_WORKER] == 1
    assert any("rerunning the same command tries them again" in note for note in result.notes)


@dataclass(frozen=True)
class Job:
    index: int
    items: tuple


def test_run_jobs_raises_a_workers_error_instead_of_counting_it_a_death():
    from medvl.data.workers import run_jobs

    def broken(job):
        raise OSError("the cache file went away")

    with pytest.raises(RuntimeError, match="a worker process failed:(.|\n)*the cache file went away"):
        run_jobs([Job(0, ((0, "a"),)), Job(1, ((1, "b"),))], broken, 2, mp.get_context("fork"), print)


def test_run_jobs_gives_up_only_the_row_that_ends_its_worker():
    from medvl.data.workers import run_jobs

    def square(job):
        for row, _ in job.items:
            if row == 4:
                os._exit(7)
        return job.index, [(row, row * row) for row, _ in job.items]

    finished = {}
    jobs = [Job(k, tuple((r, str(r)) for r in range(3 * k, 3 * k + 3))) for k in range(3)]
    run_jobs(
        jobs, square, 2, mp.get_context("fork"), lambda k, res, ended: finished.update({k: (res, ended)})
    )
    assert finished[0] == ([(0, 0), (1, 1), (2, 4)], {}) and finished[2] == ([(6, 36), (7, 49), (8, 64)], {})
    assert finished[1] == ([(3, 9), (5, 25)], {4: "exited with code 7"})

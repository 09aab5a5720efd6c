"""Checkpoints hold no pickles and a resume never runs code from one; a damaged checkpoint is reported and the
newest complete one is used instead."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from medvl.errors import RunError
from medvl.train.checkpoint import BEST_DIR, CHECKPOINT_DIR, all_checkpoints, latest_checkpoint
from medvl.train.loop import fit
from medvl.train.state_files import MANIFEST_FILE, _sha256, load_state, save_state
from tests.train.test_loop import EmaStage, assert_same, checkpoint_tensors, make_config
from tests.train.toy_stage import Interrupt


class Payload:
    """Unpickling it creates the file ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _interrupted(root: Path, **train) -> tuple[Path, Path]:
    """A run interrupted during step 5 (EMA stage state, evaluation at 2 and 4) and its straight twin."""
    cfg = make_config(eval_every=2, **train)
    straight = root / "straight"
    fit(EmaStage(cfg), straight)
    run = root / "run"
    with pytest.raises(Interrupt):
        fit(EmaStage(cfg, interrupt_at=5), run)
    return run, straight


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    run, _ = _interrupted(tmp_path_factory.mktemp("planted"))
    return run


def _files(run: Path) -> list[str]:
    return sorted(p.name for p in latest_checkpoint(run).iterdir())


def test_checkpoint_files_are_safetensors_and_json(interrupted):
    names = _files(interrupted)
    assert names == [
        "loop_state.json",
        MANIFEST_FILE,
        "model.safetensors",
        "optimizer.safetensors",
        "rng_0.safetensors",
        "scheduler.safetensors",
        "stage_state.safetensors",
    ]
    ckpt = latest_checkpoint(interrupted)
    for name in names:
        head = (ckpt / name).read_bytes()[:2]
        assert head != b"\x80\x04" and not head.startswith(b"PK"), (
            name
        )  # neither a pickle nor torch.save's zip
    rng = load_state(ckpt / "rng_0.safetensors")
    assert rng["torch"].dtype == torch.uint8 and rng["python"][0] == 3 and rng["numpy"][0] == "MT19937"
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == set(names) - {MANIFEST_FILE} and manifest["step"] == 3


@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["manifest-kept", "manifest-rewritten"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_planted_pickle_in_every_file_is_never_run(interrupted, tmp_path, kind, rewrite_manifest):
    """Replace each file of the checkpoint in turn by a pickle whose loading would create a marker file (with
    the manifest left as it was, or updated to match): the resume refuses with a RunError naming the file, and
    the marker never appears."""
    for name in _files(interrupted):
        if rewrite_manifest and name == MANIFEST_FILE:
            continue  # planting into the manifest itself is the other variant
        run = tmp_path / f"run_{name}"
        shutil.copytree(interrupted, run)
        ckpt = latest_checkpoint(run)
        marker = tmp_path / f"marker_{name}"
        target = ckpt / name
        if kind == "pickle":
            target.write_bytes(pickle.dumps({"state": Payload(marker)}))
        else:
            torch.save({"state": Payload(marker)}, target)
        if rewrite_manifest:
            manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
            manifest["files"][name] = {"size": target.stat().st_size, "sha256": _sha256(target)}
            (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(RunError) as err:
            fit(EmaStage(make_config(eval_every=2)), run, resume=True)
        assert name in str(err.value) or MANIFEST_FILE in str(err.value), (name, str(err.value))
        assert "\n" not in str(err.value)
        assert not marker.exists(), f"unpickled {name}"


def test_planted_files_outside_the_manifest_are_never_read(interrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    marker = tmp_path / "marker"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        torch.save({"state": Payload(marker)}, latest_checkpoint(run) / name)
    stage = EmaStage(make_config(eval_every=2))
    fit(stage, run, resume=True)
    assert stage.steps_seen == [4, 5, 6] and not marker.exists()


def test_planted_best_weights_restart_model_selection(interrupted, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    marker = tmp_path / "marker"
    best = json.loads((latest_checkpoint(run) / "loop_state.json").read_text())["best_step"]
    torch.save({"state": Payload(marker)}, run / BEST_DIR / f"step_{best}" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="medvl.train.checkpoint"):
        fit(EmaStage(make_config(eval_every=2)), run, resume=True)
    assert "model selection restarts" in caplog.text and not marker.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


DAMAGE = {
    "truncated-model": lambda c: _truncate(c / "model.safetensors"),
    "truncated-optimizer": lambda c: _truncate(c / "optimizer.safetensors"),
    "deleted-scheduler": lambda c: (c / "scheduler.safetensors").unlink(),
    "deleted-stage-state": lambda c: (c / "stage_state.safetensors").unlink(),
    "deleted-random-states": lambda c: (c / "rng_0.safetensors").unlink(),
    "deleted-loop-state": lambda c: (c / "loop_state.json").unlink(),
    "deleted-manifest": lambda c: (c / MANIFEST_FILE).unlink(),
    "changed-byte": lambda c: _flip_last_byte(c / "rng_0.safetensors"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Checkpoints at steps 2 and 4, interrupted during step 5; and the uninterrupted run."""
    return _interrupted(tmp_path_factory.mktemp("damaged"), checkpoint_every=2, keep_checkpoints=2)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_newest_complete_one(two_checkpoints, tmp_path, damage, caplog):
    source, straight = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert [p.name for p in all_checkpoints(run)] == ["step_4", "step_2"]
    DAMAGE[damage](run / CHECKPOINT_DIR / "step_4")
    stage = EmaStage(make_config(eval_every=2, checkpoint_every=2, keep_checkpoints=2))
    with caplog.at_level(logging.WARNING, logger="medvl.train.checkpoint"):
        fit(stage, run, resume=True)
    assert "step_4 is damaged" in caplog.text and "resuming from" in caplog.text and "step_2" in caplog.text
    assert stage.steps_seen == [3, 4, 5, 6]  # from step 2, exactly
    assert_same(checkpoint_tensors(straight, 6), checkpoint_tensors(run, 6))


def test_no_complete_checkpoint_is_a_one_line_error(two_checkpoints, tmp_path):
    source, _ = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / CHECKPOINT_DIR / "step_4" / "rng_0.safetensors").unlink()
    _truncate(run / CHECKPOINT_DIR / "step_2" / "model.safetensors")
    with pytest.raises(RunError) as err:
        fit(EmaStage(make_config(eval_every=2, checkpoint_every=2, keep_checkpoints=2)), run, resume=True)
    msg = str(err.value)
    assert "\n" not in msg and "rng_0.safetensors is missing" in msg and "model.safetensors has" in msg
    assert f"remove {run / CHECKPOINT_DIR}" in msg


def test_state_files_round_trip(tmp_path):
    import random

    import numpy as np

    obj = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "ints": {0: {"step": torch.tensor(3.0), "m": torch.arange(6.0).reshape(2, 3).t()}},
        "groups": [{"betas": (0.9, 0.999), "lr": 0.1 + 0.2, "params": [0, 1], "x": None, "flag": True}],
        "__odd": float("inf"),
    }
    t = torch.ones(3)
    obj["shared"] = [t, t]
    save_state(obj, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["python"] == obj["python"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], obj["numpy"][1])
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][2:] == obj["numpy"][2:]
    assert torch.equal(back["ints"][0]["m"], obj["ints"][0]["m"]) and back["ints"][0]["step"].item() == 3.0
    assert back["groups"] == [
        {"betas": (0.9, 0.999), "lr": 0.1 + 0.2, "params": [0, 1], "x": None, "flag": True}
    ]
    assert back["__odd"] == float("inf") and torch.equal(back["shared"][1], t)

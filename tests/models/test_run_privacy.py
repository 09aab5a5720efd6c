"""What a run directory holds of its training data: no scan ids, no pixels of training scans (the keypatch bank
keeps features and boxes; crops are cut at display time from the prepared dataset), no images in the logs unless
asked for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from medvl.data.prepared import PreparedDataset
from medvl.errors import DataError
from medvl.models.adamatch import AdaMatchRun, KeypatchBank, crop_boxes
from tests.toydata import make_tiny_prepared


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory) -> Path:
    from medvl.cli import main

    out = tmp_path_factory.mktemp("privacy") / "run"
    args = ["train", "adamatch", "--config", "tiny", "--data", str(tiny_prepared), "--out", str(out)]
    assert (
        main(
            args
            + ["--set", "train.steps=2", "--set", "train.eval_every=1", "--set", "train.checkpoint_every=1"]
        )
        == 0
    )
    return out


def test_no_scan_id_in_any_file_of_the_run(trained, tiny_prepared):
    ids = (
        PreparedDataset(tiny_prepared, split=None, require_report=False)
        .index["dicom_id"]
        .astype(str)
        .tolist()
    )
    assert len(ids) > 10 and all(len(i) >= 5 for i in ids)
    files = [p for p in trained.rglob("*") if p.is_file()]
    assert any("keypatches" in p.parts for p in files) and any(p.parent.name == "logs" for p in files)
    # an id counts where it stands alone: the toy ids ("d0009") are hex-like and turn up by chance inside the
    # SHA-256 digests of a checkpoint's manifest (one in about 30 runs); a stored id sits between quotes or commas
    patterns = {
        i: re.compile(rb"(?<![0-9A-Fa-f])" + re.escape(i.encode()) + rb"(?![0-9A-Fa-f])") for i in ids
    }
    for path in files:
        data = path.read_bytes()
        found = [i for i, pattern in patterns.items() if pattern.search(data)]
        assert not found, f"{path.relative_to(trained)} names training scans {found[:3]}"


def test_keypatch_bank_holds_features_and_boxes_only(trained):
    folder = trained / "adamatch" / KeypatchBank.DIRNAME
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_tensor(k).dtype for k in keys}
    assert keys == {"features", "boxes", "scores", "word_index", "rows"}
    assert torch.uint8 not in dtypes.values()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_crops_are_cut_from_the_prepared_dataset_at_display_time(trained, tiny_prepared, tmp_path):
    run = AdaMatchRun.from_pretrained(trained)
    bank = run.keypatch_bank
    kp = run.report_keypatches(["Small left pleural effusion."], top_k=4)
    entries = kp.entries[0].tolist()
    crops = bank.crops(entries, tiny_prepared)
    train = PreparedDataset(tiny_prepared, "train")
    expected = crop_boxes(
        torch.stack([train[int(bank.rows[e])]["image"] for e in entries]).float(), bank.boxes[entries], 16
    )
    assert crops.shape == (4, 16, 16) and crops.dtype == torch.uint8 and torch.equal(crops, expected)
    assert torch.equal(kp.boxes[0], bank.boxes[entries])
    other = make_tiny_prepared(tmp_path / "other", n=24, seed=5)
    with pytest.raises(DataError, match="not the prepared dataset this keypatch bank was mined from"):
        bank.crops(entries, other)


def test_logs_hold_no_images_by_default(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "logs"))
    events.Reload()
    assert events.Tags()["images"] == [] and "val/val_score" in events.Tags()["scalars"]

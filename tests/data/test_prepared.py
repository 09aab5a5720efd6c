"""The prepared-dataset format: cache encoding, PreparedDataset over a real prepare run, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medvl.data.images import resize_geometry
from medvl.data.mimic import prepare_mimic
from medvl.data.prepared import (
    PreparedDataset,
    from_uint8,
    map_regions,
    read_meta,
    reason_kind,
    to_uint8,
)
from medvl.data.testing import write_mimic_tree
from medvl.errors import DataError


def test_cache_encoding_roundtrip():
    x = np.linspace(-1024, 1024, 1001, dtype=np.float32)
    back = from_uint8(to_uint8(x))
    assert np.abs(back - x).max() <= 2048 / 255 / 2 + 1e-3
    assert to_uint8(np.array([-5000.0, 5000.0])).tolist() == [0, 255]


def test_dataset_over_a_prepared_tree(tmp_path):
    spec = write_mimic_tree(tmp_path / "raw", image_format="mixed")
    prepare_mimic(spec.root, tmp_path / "out", size=24)
    ds = PreparedDataset(tmp_path / "out")
    assert len(ds) == 5 and ds.size == 24
    ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a copy without the open memory map
    torch.testing.assert_close(ds2[3]["image"], ds[3]["image"])
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 1, 24, 24) and batch["labels"].shape == (5, 14)
    assert len(batch["report"]) == 5 and batch["index"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="unknown split"):
        PreparedDataset(tmp_path / "out", split="val")


def test_unprepared_directories(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "something-else", "size": 4}')
    with pytest.raises(DataError, match="format"):
        read_meta(tmp_path)


def test_map_regions_and_reason_kind():
    import pandas as pd

    regions = pd.DataFrame({"dicom_id": ["a", "b"], "finding": ["effusion", "nodule"],
                            "x0": [0.0, 0.1], "y0": [0.0, 0.1], "x1": [1.0, 0.2], "y1": [1.0, 0.2]})
    out = map_regions(regions, {"a": resize_geometry((100, 50), 40)})
    assert list(out["dicom_id"]) == ["a"] and out.loc[0, ["x0", "y0", "x1", "y1"]].tolist() == [0.25, 0, 0.75, 1]
    assert reason_kind("truncated JPEG file (image file is truncated)") == "truncated JPEG file"
    assert reason_kind("no report file (files/p10/p1/s2.txt)") == "no report file"

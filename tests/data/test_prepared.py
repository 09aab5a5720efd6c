"""The prepared-dataset format: cache encoding, PreparedDataset over a real prepare run, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medvl.data.images import resize_geometry
from medvl.data.ingest import map_regions, reason_kind
from medvl.data.mimic import prepare_mimic
from medvl.data.prepared import PreparedDataset, from_uint8, read_meta, to_uint8
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

    regions = pd.DataFrame(
        {
            "dicom_id": ["a", "b"],
            "finding": ["effusion", "nodule"],
            "x0": [0.0, 0.1],
            "y0": [0.0, 0.1],
            "x1": [1.0, 0.2],
            "y1": [1.0, 0.2],
        }
    )
    out = map_regions(regions, {"a": resize_geometry((100, 50), 40)})
    assert list(out["dicom_id"]) == ["a"] and out.loc[0, ["x0", "y0", "x1", "y1"]].tolist() == [
        0.25,
        0,
        0.75,
        1,
    ]
    assert reason_kind("truncated JPEG file (image file is truncated)") == "truncated JPEG file"
    assert reason_kind("no report file (files/p10/p1/s2.txt)") == "no report file"


# --- selection -------------------------------------------------------------------------------------------------------

VIEWS = ["PA", "", "LATERAL", "ap", "AP", "", "PA"]
STUDIES = ["s1", "s1", "s2", "s3", "s3", "s4", "s4"]


def _views_dataset(root) -> PreparedDataset:
    """Seven rows of one split; image k is filled with k, label 0 of row k is k (to check alignment)."""
    import pandas as pd

    from medvl.data.ingest import write_prepared
    from medvl.data.prepared import CACHE_FILE
    from medvl.text.chexpert import CHEXPERT_LABELS

    root.mkdir()
    n = len(VIEWS)
    index = pd.DataFrame(
        {
            "row": range(n),
            "dicom_id": [f"d{k}" for k in range(n)],
            "subject_id": "p1",
            "study_id": STUDIES,
            "split": "train",
            "view": VIEWS,
            "source": "x.jpg",
            "findings": "",
            "impression": "",
            "report": [f"report {k}" for k in range(n)],
        }
    )
    for j, c in enumerate(CHEXPERT_LABELS):
        index[c] = [float(k) if j == 0 else np.nan for k in range(n)]
    np.save(root / CACHE_FILE, np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 4, 1).repeat(4, 2))
    write_prepared(root, index, [], {"size": 4, "source": "test"})
    return PreparedDataset(root, "train")


def test_select_keeps_index_labels_and_items_aligned(tmp_path):
    ds = _views_dataset(tmp_path / "p")

    def rows(**kw) -> list[int]:
        sel = ds.select(**kw)
        picked = [int(d[1:]) for d in sel.index["dicom_id"]]
        assert picked == ds.positions(**kw).tolist()
        for i, k in enumerate(picked):  # item i of the selection is row k of the dataset
            item = sel[i]
            assert item["dicom_id"] == f"d{k}" and item["report"] == f"report {k}" and item["index"] == i
            assert float(item["labels"][0]) == k and sel.labels.shape == (len(picked), 14)
            np.testing.assert_array_equal(sel.image(i), ds.image(k))
        return picked

    frontal = ("PA", "AP")
    # A blank view (unknown) is kept by default, and dropped with keep_blank_view=False; views match in any case.
    assert rows(views=frontal) == [0, 1, 3, 4, 5, 6]
    assert rows(views=frontal, keep_blank_view=False) == [0, 3, 4, 6]
    assert rows(views=["pa"], keep_blank_view=False) == [0, 6]
    # one_per_study takes the first selected row of each study, before the limit.
    assert rows(views=frontal, keep_blank_view=False, one_per_study=True) == [0, 3, 6]
    assert rows(views=frontal, one_per_study=True) == [0, 3, 5]
    assert rows(views=frontal, limit=2) == [0, 1]
    assert rows(limit=3) == [0, 1, 2] and rows() == list(range(7)) and rows(limit=0) == list(range(7))
    assert rows(views=["LL"]) == [1, 5] and rows(views=["LL"], keep_blank_view=False) == []
    assert len(ds) == 7  # the dataset selected from is unchanged

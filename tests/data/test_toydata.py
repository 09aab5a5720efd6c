from __future__ import annotations

from medvl.data.prepared import PreparedDataset


def test_tiny_prepared_roundtrip(tiny_prepared):
    ds = PreparedDataset(tiny_prepared, split="train")
    item = ds[1]
    assert item["image"].shape == (1, 64, 64)
    assert -1024 <= float(item["image"].min()) and float(item["image"].max()) <= 1024
    assert "left pleural effusion" in item["report"]
    assert float(item["labels"][10]) == 1.0  # Pleural Effusion
    regions = ds.regions()
    assert regions is not None and set(regions["dicom_id"]) <= set(ds.index["dicom_id"])

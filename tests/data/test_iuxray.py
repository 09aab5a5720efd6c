"""prepare_iuxray on a small invented Open-i download (XML written here, synthetic PNGs)."""

from __future__ import annotations

import tarfile
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from medvl.data.iuxray import iu_split, iu_views, prepare_iuxray
from medvl.data.prepared import PreparedDataset, read_index
from medvl.data.reports import iter_iu_reports
from medvl.data.testing import synthetic_chest, write_png
from medvl.errors import DataError

SIZE = 32


def openi_xml(uid: str, findings: str, impression: str, images: list[str]) -> str:
    texts = "".join(
        f'<AbstractText Label="{label}">{text}</AbstractText>'
        for label, text in (("FINDINGS", findings), ("IMPRESSION", impression))
    )
    parents = "".join(f'<parentImage id="{i}"><figureId>F</figureId></parentImage>' for i in images)
    return (
        f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/><IUXRId id="{uid[3:]}"/>'
        f"<MedlineCitation><Article><Abstract>{texts}</Abstract></Article></MedlineCitation>"
        f"<MeSH><major>normal</major></MeSH>{parents}</eCitation>"
    )


@pytest.fixture(scope="module")
def iu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("iu")
    views = iu_views()
    pa = sorted(i for i, v in views.items() if v == "PA")[:2]
    lateral = sorted(i for i, v in views.items() if v == "LL")[0]
    unknown = "CXR99001_IM-9999-1001"
    assert unknown not in views
    reports = {
        "CXR99001": ("Heart size normal. Lungs are clear.", "Normal chest.", [pa[0], lateral]),
        "CXR99002": ("Small right pleural effusion.", "Right effusion.", [pa[1], unknown]),
        "CXR99003": ("", "", ["CXR99003_IM-9999-1001"]),  # neither section
        "CXR99004": ("Mild cardiomegaly.", "", ["CXR99004_IM-9999-1001"]),  # image missing on disk
    }
    (root / "ecgen-radiology").mkdir()
    for n, (uid, (findings, impression, images)) in enumerate(reports.items()):
        (root / "ecgen-radiology" / f"{uid[3:]}.xml").write_text(openi_xml(uid, findings, impression, images))
        for k, image_id in enumerate(images):
            if uid != "CXR99004":
                write_png(root / "NLMCXR_png" / f"{image_id}.png", synthetic_chest(40 + 8 * k, 36, seed=n))
    return {"root": root, "pa": pa, "lateral": lateral, "unknown": unknown}


def test_prepare_iuxray(iu_root, tmp_path):
    root = iu_root["root"]
    result = prepare_iuxray(root, tmp_path / "out", size=SIZE)
    index = read_index(tmp_path / "out")
    assert list(index["dicom_id"]) == [iu_root["pa"][0], iu_root["pa"][1], iu_root["unknown"]]
    assert list(index["view"]) == ["PA", "PA", ""]  # the unknown view is kept, blank
    assert list(index["subject_id"]) == ["CXR99001", "CXR99002", "CXR99002"]
    assert index.loc[0, "report"] == "Heart size normal. Lungs are clear. Normal chest."
    assert index.loc[0, "source"] == f"NLMCXR_png/{iu_root['pa'][0]}.png"
    assert (
        index[[c for c in index.columns if c[0].isupper()]].isna().all().all()
    )  # no CheXpert labels in Open-i
    assert list(index["split"]) == [iu_split("CXR99001"), iu_split("CXR99002"), iu_split("CXR99002")]
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv", dtype=str)
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    assert reasons == {
        f"NLMCXR_png/{iu_root['lateral']}.png": "view LL not selected (views PA,AP)",
        "NLMCXR_png/CXR99003_IM-9999-1001.png": "report has neither a FINDINGS nor an IMPRESSION section",
        "CXR99004_IM-9999-1001.png": "image file missing",
    }
    assert result.kept == 3 and any("unknown view" in n for n in result.notes)
    ds = PreparedDataset(tmp_path / "out")
    assert ds[2]["image"].shape == (1, SIZE, SIZE)


def test_sections_and_tgz_root(iu_root, tmp_path):
    root = tmp_path / "raw"
    (root / "NLMCXR_png").mkdir(parents=True)
    for png in (iu_root["root"] / "NLMCXR_png").iterdir():
        (root / "NLMCXR_png" / png.name).write_bytes(png.read_bytes())
    with tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as tf:
        tf.add(iu_root["root"] / "ecgen-radiology", arcname="ecgen-radiology")
    prepare_iuxray(root, tmp_path / "out", size=SIZE, sections="impression")
    index = read_index(tmp_path / "out")
    assert list(index["report"]) == ["Normal chest.", "Right effusion.", "Right effusion."]


def test_split_is_patient_disjoint_deterministic_and_70_10_20():
    uids = [r.uid for r in iter_iu_reports()]
    splits = [iu_split(u, seed=0) for u in uids]
    counts = Counter(splits)
    assert abs(counts["train"] / len(uids) - 0.7) < 0.03
    assert abs(counts["validate"] / len(uids) - 0.1) < 0.02
    assert abs(counts["test"] / len(uids) - 0.2) < 0.03
    assert splits == [iu_split(u, seed=0) for u in uids]
    assert np.mean([a != b for a, b in zip(splits, [iu_split(u, seed=1) for u in uids], strict=True)]) > 0.3


def test_bad_root(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        prepare_iuxray(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        prepare_iuxray(tmp_path / "empty", tmp_path / "out")

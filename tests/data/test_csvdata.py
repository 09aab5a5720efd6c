"""prepare_csv (``medvl prepare csv``) on tables written here, with PNG, JPG and DICOM images drawn here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import medvl.data.ingest as ingest_module
from medvl.data.csvdata import parse_columns, prepare_csv, split_value
from medvl.data.dicom import write_dicom
from medvl.data.iuxray import iu_split
from medvl.data.prepared import PreparedDataset, read_index, read_meta
from medvl.data.testing import chest_dataset, synthetic_chest, write_jpg, write_png
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS

SIZE = 32
REPORTS = (
    "Heart size is normal. The lungs are clear.",
    "Small left pleural effusion. No pneumothorax.",
    "The heart is enlarged. No pleural effusion.",
    "Right lower lobe consolidation. Heart size normal.",
)


def draw(root, kind: str, name: str, seed: int, shape=(48, 40)):
    unit = synthetic_chest(*shape, seed=seed)
    path = root / kind / f"{name}.{ {'png': 'png', 'jpg': 'jpg', 'dcm': 'dcm'}[kind] }"
    if kind == "png":
        return write_png(path, unit)
    if kind == "jpg":
        return write_jpg(path, unit)
    return write_dicom(chest_dataset(unit), path)


def index_by_source(out):
    return read_index(out).set_index("source")


@pytest.fixture
def custom(tmp_path):
    """A table with other column names: PNG, JPG and DICOM rows, an absolute path, and one bad row of each kind."""
    root = tmp_path / "images"
    same = synthetic_chest(48, 40, seed=7)
    write_png(root / "png" / "same.png", same)
    write_dicom(chest_dataset(same), root / "dcm" / "same.dcm")
    draw(root, "jpg", "j1", 1)
    outside = draw(tmp_path / "elsewhere", "png", "abs", 2)
    draw(root, "png", "p3", 3)
    (root / "png" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    rows = [  # Path, Text, Fold, Patient, Cardiomegaly, effusion
        ("png/same.png", REPORTS[0], "train", "A", "0", ""),  # line 2
        ("dcm/same.dcm", REPORTS[1], "VAL", "B", "", "1"),  # line 3
        ("jpg/j1.jpg", REPORTS[2], "test", "C", "1.0", "-1"),  # line 4
        (str(outside), REPORTS[3], "Validate", "D", "", ""),  # line 5: absolute path
        ("png/missing.png", REPORTS[0], "train", "E", "", ""),  # line 6: no such file
        ("png/broken.png", REPORTS[0], "train", "F", "", ""),  # line 7: unreadable
        ("png/p3.png", "   ", "train", "G", "", ""),  # line 8: empty report
        ("png/p3.png", REPORTS[0], "holdout", "G", "", ""),  # line 9: unknown split
        ("png/p3.png", REPORTS[0], "train", "G", "2", ""),  # line 10: bad label value
        ("", REPORTS[0], "train", "H", "", ""),  # line 11: no image
        ("png/same.png", REPORTS[0], "train", "A", "", ""),  # line 12: the image of line 2 again
        ("png/p3.png", REPORTS[0], "train", "", "", ""),  # line 13: no patient id
    ]
    table = pd.DataFrame(rows, columns=["Path", "Text", "Fold", "Patient", "Cardiomegaly", "effusion"])
    csv = tmp_path / "table.csv"
    table.to_csv(csv, index=False)
    columns = parse_columns("image=Path, report=Text,split=Fold,patient_id=Patient,Pleural Effusion=effusion")
    return {"csv": csv, "root": root, "columns": columns, "outside": outside}


def test_custom_columns_formats_and_bad_rows(custom, tmp_path):
    out = tmp_path / "out"
    result = prepare_csv(custom["csv"], out, image_root=custom["root"], columns=custom["columns"], size=SIZE)
    index = index_by_source(out)
    assert list(index.index) == ["png/same.png", "dcm/same.dcm", "jpg/j1.jpg", custom["outside"].as_posix()]
    assert list(index["split"]) == ["train", "validate", "test", "validate"]
    assert list(index["subject_id"]) == ["A", "B", "C", "D"]
    assert index.loc["dcm/same.dcm", "dicom_id"] == "dcm/same"  # unique where the stems are not
    assert index.loc["png/same.png", "report"] == REPORTS[0]
    assert list(index["view"]) == ["", "PA", "", ""]  # no view column: the DICOM header's ViewPosition
    assert any(n.startswith("3 images have no view") and "--view PA" in n for n in result.notes)
    # Labels from the two label columns the table has, by name; the 12 others blank.
    card, eff = CHEXPERT_LABELS.index("Cardiomegaly"), CHEXPERT_LABELS.index("Pleural Effusion")
    labels = index[list(CHEXPERT_LABELS)].to_numpy()
    np.testing.assert_array_equal(labels[:, card], [0.0, np.nan, 1.0, np.nan])
    np.testing.assert_array_equal(labels[:, eff], [np.nan, 1.0, -1.0, np.nan])
    others = [j for j in range(14) if j not in (card, eff)]
    assert np.isnan(labels[:, others]).all()
    assert any("2 of the 14 CheXpert columns" in note for note in result.notes)

    skipped = pd.read_csv(out / "skipped.csv", keep_default_na=False)
    by_path = dict(zip(skipped["path"], skipped["reason"], strict=True))
    lines = skipped["reason"].str.extract(r"table.csv line (\d+)\)$")[0].dropna().astype(int)
    reasons = dict(zip(lines, skipped["reason"][lines.index], strict=True))
    assert sorted(reasons) == [6, 8, 9, 10, 11, 12, 13]
    assert reasons[6].startswith("image file missing")
    assert reasons[8].startswith("empty report")
    assert reasons[9].startswith("unknown split 'holdout'")
    assert reasons[10].startswith("bad label value '2' in column 'Cardiomegaly'")
    assert reasons[11].startswith("no image path")
    assert reasons[12].startswith("duplicate image (also on table.csv line 2)")
    assert reasons[13].startswith("no patient id")
    assert by_path["png/broken.png"].startswith("unreadable image")  # the reader's reason, at decoding
    assert result.kept == 4 and result.skipped == 8

    # The same picture as PNG and as DICOM reaches the cache as (nearly) the same image.
    ds = PreparedDataset(out)
    png, dcm = ds.image(0), ds.image(1)
    assert png.shape == (SIZE, SIZE) and -1024 <= png.min() and png.max() <= 1024
    assert np.corrcoef(png.ravel(), dcm.ravel())[0, 1] > 0.98
    meta = read_meta(out).meta
    assert meta["source"] == "csv" and meta["labels"] == "csv" and meta["split"]["from"] == "column"
    assert meta["counts"]["by_split"] == {"train": 1, "validate": 2, "test": 1}


def test_seeded_patient_disjoint_split_and_labeler(tmp_path):
    root = tmp_path
    rows = []
    for p in range(12):
        for k in range(3):  # three images per patient, two studies
            kind = ("png", "jpg", "dcm")[k]
            path = draw(root, kind, f"p{p}_{k}", seed=p * 3 + k)
            rows.append(
                {
                    "image": path.relative_to(root).as_posix(),
                    "findings": REPORTS[(p + k) % 4],
                    "impression": "No acute disease." if k else "",
                    "patient_id": f"P{p:03d}",
                    "study_id": f"S{p}_{min(k, 1)}",
                    "view": "pa",
                }
            )
    pd.DataFrame(rows).to_csv(root / "t.csv", index=False)
    result = prepare_csv(root / "t.csv", tmp_path / "out", size=SIZE, sections="findings")
    index = read_index(tmp_path / "out")
    assert len(index) == 36
    assert (index.groupby("subject_id")["split"].nunique() == 1).all()
    for patient, split in zip(index["subject_id"], index["split"], strict=True):
        assert split == iu_split(patient, 0)
    assert set(index["split"]) <= {"train", "validate", "test"}
    assert any("seeded 70/10/20 split by patient_id" in n and "patient-disjoint" in n for n in result.notes)
    assert set(index["view"]) == {"PA"} and index["study_id"].nunique() == 24
    # sections=findings: the report is the findings; the labeler read findings and impression.
    row = index[index["findings"] == REPORTS[1]].iloc[0]
    assert row["report"] == REPORTS[1]
    assert row["Pleural Effusion"] == 1.0 and row["Pneumothorax"] == 0.0
    assert read_meta(tmp_path / "out").meta["labels"] == "labeler"

    leaking = pd.DataFrame(rows).assign(split=["train", "test", "train"] * 12)
    leaking.to_csv(root / "leak.csv", index=False)
    with pytest.raises(DataError, match="12 patient\\(s\\) appear in more than one split"):
        prepare_csv(root / "leak.csv", tmp_path / "leak", size=SIZE)
    # Left out with an empty name, the split column gives way to the seeded split; a BOM is no column name.
    (root / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (root / "leak.csv").read_bytes())
    prepare_csv(root / "bom.csv", tmp_path / "unsplit", size=SIZE, columns=parse_columns("split="))
    assert read_index(tmp_path / "unsplit")["split"].tolist() == index["split"].tolist()


def test_column_errors(custom, tmp_path):
    with pytest.raises(DataError, match="no image column 'image'"):
        prepare_csv(custom["csv"], tmp_path / "a", image_root=custom["root"])
    with pytest.raises(DataError, match=r"no column\(s\) \['Report'\]"):
        prepare_csv(
            custom["csv"],
            tmp_path / "b",
            image_root=custom["root"],
            columns={"image": "Path", "report": "Report"},
        )
    with pytest.raises(DataError, match="unknown key"):
        prepare_csv(custom["csv"], tmp_path / "c", image_root=custom["root"], columns={"picture": "Path"})
    with pytest.raises(DataError, match="not KEY=COLUMN"):
        parse_columns("image")
    assert (
        split_value(" Val ") == "validate" and split_value("valid") == "validate" and split_value("x") is None
    )


def test_interrupted_run_resumes(custom, tmp_path, monkeypatch):
    args = {"image_root": custom["root"], "columns": custom["columns"], "size": SIZE}
    reference = tmp_path / "reference"
    prepare_csv(custom["csv"], reference, **args)
    real = ingest_module._read_and_resize
    calls: list[str] = []

    def interrupted(path, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, *a)

    monkeypatch.setattr(ingest_module, "_read_and_resize", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_csv(custom["csv"], out, **args)
    assert not (out / "meta.json").exists()

    def counting(path, *a):
        calls.append(path)
        return real(path, *a)

    calls.clear()
    monkeypatch.setattr(ingest_module, "_read_and_resize", counting)
    result = prepare_csv(custom["csv"], out, **args)
    assert result.reused > 0 and result.decoded == len(calls) < 5
    for name in ("index.csv", "skipped.csv"):
        assert (out / name).read_text() == (reference / name).read_text()
    np.testing.assert_array_equal(np.load(out / "images.npy"), np.load(reference / "images.npy"))
    with pytest.raises(DataError, match="other settings"):
        prepare_csv(custom["csv"], out, **{**args, "sections": "findings"})


def test_cli_prepare_csv_then_train_adamatch(tmp_path, capsys):
    from medvl.cli import main

    rows = []
    for i in range(24):
        path = draw(tmp_path / "img", ("png", "jpg", "dcm")[i % 3], f"x{i}", seed=i, shape=(72, 64))
        split = "train" if i < 16 else ("val" if i < 20 else "test")
        rows.append((path.relative_to(tmp_path / "img").as_posix(), REPORTS[i % 4], split, f"P{i}"))
    pd.DataFrame(rows, columns=["file", "text", "fold", "pid"]).to_csv(tmp_path / "cxr.csv", index=False)
    data = tmp_path / "data"
    code = main(
        [
            "prepare", "csv", "--csv", str(tmp_path / "cxr.csv"), "--image-root", str(tmp_path / "img"),
            "--out", str(data), "--size", "64", "--columns", "image=file,report=text,split=fold,patient_id=pid",
            "--view", "pa",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "prepared 24 images" in capsys.readouterr().out
    assert set(read_index(data)["view"]) == {"PA"}
    code = main(
        [
            "train", "adamatch", "--config", "tiny", "--data", str(data), "--out", str(tmp_path / "run"),
            "--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "stage.json").read_text())["stage"] == "adamatch"
    assert main(["prepare", "csv", "--csv", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "x")]) == 2
    assert "no such CSV file" in capsys.readouterr().err

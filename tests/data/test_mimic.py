"""prepare_mimic on synthetic MIMIC-CXR / MIMIC-CXR-JPG trees (invented content, real layout and column names)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import medvl.data.ingest as ingest_module
from medvl.cli import main as cli_main
from medvl.data.images import read_xray, resize_geometry, resize_xray
from medvl.data.mimic import prepare_mimic
from medvl.data.prepared import INDEX_COLUMNS, PreparedDataset, read_index, to_uint8
from medvl.data.testing import MARKER_BOX, expected_labels, write_mimic_tree
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS

SIZE = 32


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("mimic")
    return {
        fmt: write_mimic_tree(base / fmt, image_format=fmt, gz=(fmt != "dcm"))
        for fmt in ("jpg", "dcm", "mixed")
    }


def skipped_table(out) -> dict[str, str]:
    df = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == ["path", "reason"]
    return dict(zip(df["path"], df["reason"], strict=True))


def check_prepared(spec, out, sections="findings"):
    kept, skipped = spec.expected(sections)
    index = read_index(out)
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert list(index["dicom_id"]) == kept
    got = skipped_table(out)
    assert set(got) == set(skipped), (sorted(got), sorted(skipped))
    for path, reason in skipped.items():
        assert got[path].startswith(reason) or reason in got[path], (path, got[path], reason)
    # labels mapped by name (the tree's table is alphabetical, CheXpert's order is not)
    np.testing.assert_array_equal(
        index[list(CHEXPERT_LABELS)].to_numpy(np.float32), expected_labels(spec, kept)
    )
    by_id = {i.dicom_id: i for i in spec.images}
    assert list(index["split"]) == [by_id[d].split for d in kept]
    assert list(index["view"]) == [by_id[d].view for d in kept]
    assert list(index["source"]) == [spec.path(by_id[d]) for d in kept]
    assert list(index["subject_id"]) == [by_id[d].subject_id for d in kept]
    # each index row points at the cache row holding its own file, resized once
    images = np.load(out / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE)
    for row, source in zip(index["row"], index["source"], strict=True):
        expected = to_uint8(resize_xray(read_xray(spec.root / source), SIZE))
        np.testing.assert_array_equal(images[row], expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "medvl-prepared/1" and meta["size"] == SIZE and meta["sections"] == sections
    assert meta["source"] == "mimic-cxr" and meta["counts"]["images"] == len(kept)
    assert meta["counts"]["skipped"] == len(skipped)
    return index


@pytest.mark.parametrize("fmt", ["jpg", "dcm", "mixed"])
def test_prepare_tree_gives_exactly_the_expected_rows(trees, tmp_path, fmt):
    spec = trees[fmt]
    result = prepare_mimic(spec.root, tmp_path / "out", size=SIZE)
    index = check_prepared(spec, tmp_path / "out")
    assert (
        result.kept == len(index) == 5 and result.skipped == 8 and result.decoded == 6 and result.reused == 0
    )
    findings = {s.study_id: s for s in spec.studies}
    for _, row in index.iterrows():
        study = findings[row["study_id"]]
        if study.report == "plain":  # no headers: the last paragraph stands in
            assert row["report"] == study.findings and row["findings"] == ""
        else:
            assert row["report"] == row["findings"] == study.findings
            assert row["impression"] == study.impression
    assert "telephone" not in " ".join(index["report"])  # the addendum stays out


@pytest.mark.parametrize("sections", ["impression", "both"])
def test_sections_choice(trees, tmp_path, sections):
    spec = trees["jpg"]
    prepare_mimic(spec.root, tmp_path / "out", size=SIZE, sections=sections)
    index = check_prepared(spec, tmp_path / "out", sections)
    row = index[index["study_id"] == "50000004"].iloc[0]  # the report without FINDINGS
    assert row["report"] == "Possible right lower lobe pneumonia."


def test_dicom_and_jpg_trees_agree_and_keep_orientation(trees, tmp_path):
    """The same drawings stored as JPG and as 12-bit DICOM (MONOCHROME1 among them) give the same cached images,
    and the left-side marker is on the left in what PreparedDataset returns."""
    outs = {}
    for fmt in ("jpg", "dcm"):
        prepare_mimic(trees[fmt].root, tmp_path / fmt, size=SIZE)
        outs[fmt] = PreparedDataset(tmp_path / fmt)
    a, b = outs["jpg"], outs["dcm"]
    assert list(a.index["dicom_id"]) == list(b.index["dicom_id"])
    geom = resize_geometry((48, 40), SIZE)
    top, left = geom.offset
    h, w = geom.resized
    x0, y0, x1, y1 = MARKER_BOX
    for i in range(len(a)):
        ia, ib = a[i]["image"][0].numpy(), b[i]["image"][0].numpy()
        assert np.abs(ia - ib).mean() < 20  # JPEG q95 vs lossless 12-bit
        inner = ib[top : top + h, left : left + w]
        ys = slice(int(y0 * h), int(np.ceil(y1 * h)))
        marker = inner[ys, int(x0 * w) : int(np.ceil(x1 * w))].max()
        mirrored = inner[ys, w - int(np.ceil(x1 * w)) : w - int(x0 * w)].max()
        assert marker > mirrored + 300, (i, marker, mirrored)


def test_regions_follow_the_kept_images_and_the_padding(trees, tmp_path):
    spec = trees["mixed"]
    prepare_mimic(spec.root, tmp_path / "out", size=SIZE)
    ds = PreparedDataset(tmp_path / "out")
    regions = ds.regions()
    assert regions is not None and list(regions["dicom_id"]) == list(ds.index["dicom_id"])
    geom = resize_geometry((48, 40), SIZE)
    expected = geom.map_box(*MARKER_BOX)
    np.testing.assert_allclose(
        regions[["x0", "y0", "x1", "y1"]].to_numpy(), [expected] * len(regions), atol=1e-6
    )
    assert expected[0] > MARKER_BOX[0]  # a 48 x 40 image is padded left and right, so x moves right


def test_prepared_dataset_items(trees, tmp_path):
    prepare_mimic(trees["jpg"].root, tmp_path / "out", size=SIZE)
    ds = PreparedDataset(tmp_path / "out", split="train")
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype.is_floating_point
    assert -1024 <= float(item["image"].min()) and float(item["image"].max()) <= 1024
    assert item["report"] == "Heart size is normal. The lungs are clear."
    assert float(item["labels"][CHEXPERT_LABELS.index("No Finding")]) == 1.0
    assert np.isnan(float(item["labels"][CHEXPERT_LABELS.index("Edema")]))
    assert item["study_id"] == "50000001" and item["subject_id"] == "10000001"
    assert len(PreparedDataset(tmp_path / "out", split="test")) == 2


def test_interrupted_run_resumes_without_redoing_finished_images(trees, tmp_path, monkeypatch):
    spec = trees["mixed"]
    reference = tmp_path / "reference"
    prepare_mimic(spec.root, reference, size=SIZE)

    real = ingest_module._read_and_resize
    calls: list[str] = []

    def interrupted(path, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(ingest_module, "_read_and_resize", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_mimic(spec.root, out, size=SIZE)
    assert not (out / "meta.json").exists()  # unfinished: no completion mark
    markers = sorted((out / ".prepare").glob("chunk_*.json"))
    assert len(markers) == 1  # chunks of two images: the first finished, the second was interrupted

    def counting(path, *args):
        calls.append(path)
        return real(path, *args)

    calls.clear()
    monkeypatch.setattr(ingest_module, "_read_and_resize", counting)
    result = prepare_mimic(spec.root, out, size=SIZE)
    assert len(calls) == 4 and result.decoded == 4 and result.reused == 2
    assert (out / "index.csv").read_text() == (reference / "index.csv").read_text()
    assert (out / "skipped.csv").read_text() == (reference / "skipped.csv").read_text()
    np.testing.assert_array_equal(np.load(out / "images.npy"), np.load(reference / "images.npy"))

    calls.clear()  # a finished run reruns without decoding anything
    result = prepare_mimic(spec.root, out, size=SIZE)
    assert calls == [] and result.reused == 6 and result.decoded == 0
    assert (out / "index.csv").read_text() == (reference / "index.csv").read_text()

    with pytest.raises(DataError, match="other settings.*size 32 -> 64"):
        prepare_mimic(spec.root, out, size=SIZE * 2)
    with pytest.raises(DataError, match="other settings.*sections 'findings' -> 'both'"):
        prepare_mimic(spec.root, out, size=SIZE, sections="both")
    assert (out / "meta.json").exists()  # a refused rerun leaves the finished dataset intact


def test_two_workers_give_the_same_result(trees, tmp_path):
    spec = trees["mixed"]
    prepare_mimic(spec.root, tmp_path / "one", size=SIZE, workers=1)
    result = prepare_mimic(spec.root, tmp_path / "two", size=SIZE, workers=2)
    assert result.decoded == 6
    assert (tmp_path / "one" / "index.csv").read_text() == (tmp_path / "two" / "index.csv").read_text()
    np.testing.assert_array_equal(
        np.load(tmp_path / "one" / "images.npy"), np.load(tmp_path / "two" / "images.npy")
    )


def test_jpg_compatible_and_view_choice(trees, tmp_path):
    spec = trees["dcm"]
    prepare_mimic(spec.root, tmp_path / "out", size=SIZE, jpg_compatible=True, views=["PA"])
    index = read_index(tmp_path / "out")
    assert set(index["view"]) == {"PA"} and len(index) == 3
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["jpg_compatible"] is True and meta["views"] == ["PA"]
    img = PreparedDataset(tmp_path / "out")[0]["image"]
    assert float(img.max()) == 1024  # histogram-equalised DICOMs reach white


def test_bad_roots(tmp_path, trees):
    with pytest.raises(DataError, match="not a directory"):
        prepare_mimic(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "files").mkdir(parents=True)
    with pytest.raises(DataError, match="metadata"):
        prepare_mimic(tmp_path / "empty", tmp_path / "out")


def test_cli(trees, tmp_path, capsys):
    rc = cli_main(
        [
            "prepare",
            "mimic-cxr",
            "--root",
            str(trees["jpg"].root),
            "--out",
            str(tmp_path / "out"),
            "--size",
            str(SIZE),
            "--sections",
            "both",
        ]
    )
    assert rc == 0
    assert "prepared 6 images" in capsys.readouterr().out
    rc = cli_main(
        ["prepare", "mimic-cxr", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]
    )
    assert rc == 2
    assert "medvl: error:" in capsys.readouterr().err


def test_reports_from_the_zip_and_uncompressed_tables(tmp_path):
    """MIMIC-CXR ships reports as mimic-cxr-reports.zip; the tables may be plain .csv."""
    import zipfile

    spec = write_mimic_tree(tmp_path / "raw", image_format="jpg", gz=False)
    with zipfile.ZipFile(spec.root / "mimic-cxr-reports.zip", "w") as zf:
        for txt in sorted((spec.root / "files").rglob("s*.txt")):
            zf.write(txt, arcname=txt.relative_to(spec.root).as_posix())
            txt.unlink()
    prepare_mimic(spec.root, tmp_path / "out", size=SIZE)
    check_prepared(spec, tmp_path / "out")

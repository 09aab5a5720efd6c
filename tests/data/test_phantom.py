"""IU-Phantom: the raw tree, the ingestion of it, and the drawn ground truth.

One small build (24 studies at 128 px) is shared by the module; a second one checks determinism.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from medvl.data.mimic import CHEXPERT_TABLE_COLUMNS, METADATA_TABLE_COLUMNS, SPLIT_TABLE_COLUMNS
from medvl.data.phantom import (
    plan_findings,
    prepare_phantom,
)
from medvl.data.phantom.anatomy import lesion_diameters, load_lung_atlas
from medvl.data.phantom.draw import render_frontal
from medvl.data.phantom.frame import SEVERITY_SCALE, DrawSpec
from medvl.data.prepared import PreparedDataset, read_index
from medvl.data.reports import parse_mimic_report, report_text
from medvl.errors import DataError
from medvl.text.attributes import SEVERITY_ORDER
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import extract_mentions, label_reports
from medvl.text.layout import ALLOWED_ZONES, ZONE_FALLBACK, Device, Side, Zone, stated_sides
from medvl.text.phrases import Finding

STUDIES, SIZE, SEED = 24, 128, 0

#: Where a box centre may lie, as a fraction of its lung's height (top 0, bottom 1): the anatomical meaning of each
#: zone with a margin, independent of the drawing code's own spans.
ZONE_RANGE = {
    "apex": (0.0, 0.3),
    "upper": (0.0, 0.5),
    "mid": (0.25, 0.75),
    "lower": (0.5, 1.0),
    "base": (0.55, 1.05),
    "perihilar": (0.2, 0.75),
    "retrocardiac": (0.45, 1.0),
}
LUNG_KINDS = {
    "effusion",
    "pneumothorax",
    "consolidation",
    "opacity",
    "pneumonia",
    "atelectasis",
    "edema",
    "nodule",
    "mass",
    "granuloma",
    "pleural_other",
    "fracture",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "ph"
    prepare_phantom(out, studies=STUDIES, size=SIZE, seed=SEED, workers=1)
    return out


def _read_gz(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _lung_boxes(anatomy: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) normalised of the image-left lung (patient right) and image-right lung (patient left)."""
    S = anatomy.shape[-1]
    out = []
    for ch in (0, 1):
        ys, xs = np.nonzero(anatomy[ch])
        out.append((xs.min() / S, ys.min() / S, (xs.max() + 1) / S, (ys.max() + 1) / S))
    return out


def _check_box(row, anatomy: np.ndarray) -> None:
    """The region's box lies on its side and in its zone."""
    cx, cy = (row.x0 + row.x1) / 2, (row.y0 + row.y1) / 2
    assert 0 <= row.x0 < row.x1 <= 1 and 0 <= row.y0 < row.y1 <= 1
    if row.side == "left":  # the patient's left is on the image's right
        assert cx > 0.5, row
    elif row.side == "right":
        assert cx < 0.5, row
    if row.zone and row.finding in LUNG_KINDS:
        lung = _lung_boxes(anatomy)[1 if row.side == "left" else 0]
        frac = (cy - lung[1]) / (lung[3] - lung[1])
        lo, hi = ZONE_RANGE[row.zone]
        assert lo <= frac <= hi, (row, frac)
        if row.zone in ("perihilar", "retrocardiac"):
            medial = lung[0] if row.side == "left" else lung[2]
            width = lung[2] - lung[0]
            assert abs(cx - medial) <= 0.6 * width, row


# --- the raw tree ---------------------------------------------------------------------------------------------------


def test_raw_tree_layout_and_tables(built):
    raw = built / "raw"
    meta = _read_gz(raw / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = _read_gz(raw / "mimic-cxr-2.0.0-split.csv.gz")
    chex = _read_gz(raw / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert tuple(meta.columns) == METADATA_TABLE_COLUMNS
    assert tuple(split.columns) == SPLIT_TABLE_COLUMNS
    assert tuple(chex.columns) == CHEXPERT_TABLE_COLUMNS and list(chex.columns[2:]) == sorted(CHEXPERT_LABELS)
    assert len(chex) == STUDIES and chex["study_id"].is_unique
    assert set(meta["dicom_id"]) == set(split["dicom_id"])
    assert (
        set(meta["ViewPosition"]) <= {"PA", "AP", "LATERAL"}
        and (meta["ViewPosition"] == "LATERAL").sum() >= 1
    )
    assert meta["subject_id"].str.fullmatch(r"1\d{7}").all()
    assert meta["study_id"].str.fullmatch(r"5\d{7}").all()
    assert meta["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    for values in chex[list(CHEXPERT_LABELS)].to_numpy().ravel():
        assert values in ("", "1.0", "0.0", "-1.0")
    kinds = {}
    for d, s, t in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"], strict=True):
        folder = raw / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}"
        files = [p for p in (folder / f"{d}.jpg", folder / f"{d}.dcm") if p.exists()]
        assert len(files) == 1, d
        kinds[d] = files[0].suffix
        text = (folder.parent / f"s{t}.txt").read_text()
        assert "FINAL REPORT" in text and ("FINDINGS:" in text or "IMPRESSION:" in text)
        assert all(line.startswith(" ") or not line for line in text.splitlines())
    dicoms = [d for d, k in kinds.items() if k == ".dcm"]
    assert len(dicoms) >= 2
    photometric = set()
    for d in dicoms:
        path = next(raw.rglob(f"{d}.dcm"))
        ds = pydicom.dcmread(path)
        assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST" and ds.BitsStored == 12
        assert ds.pixel_array.max() <= 4095 and ds.Rows == SIZE
        photometric.add(ds.PhotometricInterpretation)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_split_is_patient_disjoint(built):
    split = _read_gz(built / "raw" / "mimic-cxr-2.0.0-split.csv.gz")
    per_subject = split.groupby("subject_id")["split"].nunique()
    assert (per_subject == 1).all()
    assert set(split["split"]) == {"train", "validate", "test"}
    assert split.groupby("subject_id")["study_id"].nunique().max() >= 2  # some patients have several studies


def test_lung_masks_are_split_disjoint(built):
    """No test or validation scan reuses the anatomy (the real lung mask) of a training scan."""
    images = _read_gz(built / "raw" / "phantom_images.csv")
    frontal = images[images["lung_mask"] != ""]
    per_mask = frontal.groupby("lung_mask")["split"].nunique()
    assert (per_mask == 1).all(), per_mask[per_mask > 1]
    assert frontal["lung_mask"].nunique() >= 3


def test_ingestion_skips_only_laterals(built):
    raw = built / "raw"
    meta = _read_gz(raw / "mimic-cxr-2.0.0-metadata.csv.gz")
    skipped = pd.read_csv(built / "skipped.csv", keep_default_na=False)
    assert len(skipped) == (meta["ViewPosition"] == "LATERAL").sum()
    assert skipped["reason"].str.startswith("view LATERAL").all()
    index = read_index(built)
    frontal = meta[meta["ViewPosition"] != "LATERAL"]
    assert set(index["dicom_id"]) == set(frontal["dicom_id"])
    assert (index["report"].str.len() > 0).all()
    # Regions travel into the prepared dataset unchanged (square images: no padding).
    raw_regions = pd.read_csv(raw / "regions.csv", dtype={"dicom_id": str}, keep_default_na=False)
    prepared_regions = PreparedDataset(built).regions()
    assert len(prepared_regions) == len(raw_regions) > 0
    assert np.allclose(
        prepared_regions[["x0", "y0", "x1", "y1"]].to_numpy(float),
        raw_regions[["x0", "y0", "x1", "y1"]].to_numpy(float),
        atol=1e-6,
    )


def test_labels_are_the_labelers(built):
    """chexpert.csv holds label_reports() of the findings + impression the ingestion reads back."""
    index = read_index(built)
    labels = label_reports(list(index["report"]))
    stored = index[list(CHEXPERT_LABELS)].to_numpy(np.float32)
    assert np.array_equal(np.isnan(labels), np.isnan(stored))
    assert np.array_equal(np.nan_to_num(labels, nan=9), np.nan_to_num(stored, nan=9))


# --- ground truth -------------------------------------------------------------------------------------------------


def test_regions_lie_on_the_reported_side_and_zone(built):
    raw = built / "raw"
    regions = pd.read_csv(raw / "regions.csv", dtype={"dicom_id": str}, keep_default_na=False)
    assert list(regions.columns[:8]) == ["dicom_id", "finding", "side", "zone", "x0", "y0", "x1", "y1"]
    assert {"observation", "word"} <= set(regions.columns)
    meta = _read_gz(raw / "mimic-cxr-2.0.0-metadata.csv.gz").set_index("dicom_id")
    checked_side = checked_zone = 0
    for dicom_id, rows in regions.groupby("dicom_id"):
        m = meta.loc[dicom_id]
        with np.load(raw / "masks" / f"{dicom_id}.npz") as z:
            masks, anatomy = z["regions"], z["anatomy"]
        assert masks.shape == (len(rows), SIZE, SIZE) and anatomy.shape == (4, SIZE, SIZE)
        txt = (raw / "files" / f"p{m.subject_id[:2]}" / f"p{m.subject_id}" / f"s{m.study_id}.txt").read_text()
        mentions = [
            x
            for x in extract_mentions(report_text(parse_mimic_report(txt), "both"))
            if x.value == 1 and x.finding is not None
        ]
        for k, row in enumerate(rows.itertuples()):
            _check_box(row, anatomy)
            ys, xs = np.nonzero(masks[k])  # the box is the mask's box
            assert abs(xs.min() / SIZE - row.x0) < 1e-3 and abs((ys.max() + 1) / SIZE - row.y1) < 1e-3
            same = [x for x in mentions if x.finding.value == row.finding]
            assert same, f"{row.finding} drawn without a positive mention"
            stated = {
                s for x in same for s in (("left", "right") if x.side == "bilateral" else (x.side,)) if s
            }
            if row.side and stated and row.finding != "device":
                assert row.side in stated, (row, stated)
                checked_side += 1
            zones = {x.zone for x in same if x.zone and x.side in (row.side, "bilateral", None)}
            if row.zone and len(zones) == 1 and row.finding in LUNG_KINDS:
                z = Zone(zones.pop())
                allowed = ALLOWED_ZONES.get(Finding(row.finding))
                expected = z if allowed is None or z in allowed else None
                if expected is None:
                    fb = ZONE_FALLBACK.get(z)
                    expected = fb if fb in allowed else None
                if expected is not None:
                    assert row.zone == expected.value, (row, z)
                    checked_zone += 1
    assert checked_side >= 3 and checked_zone >= 1


def test_normal_reports_draw_nothing(built):
    index = read_index(built)
    regions = pd.read_csv(built / "regions.csv", dtype={"dicom_id": str}, keep_default_na=False)
    normal = index[(index["No Finding"] == 1) & (index["Support Devices"] != 1)]
    # CheXpert's No Finding still allows an old granuloma, which the phantom draws: normal under the iu convention.
    iu = label_reports(list(normal["report"]), convention="iu")
    normal = normal[iu[:, CHEXPERT_LABELS.index("No Finding")] == 1]
    assert len(normal) >= 5
    assert not set(normal["dicom_id"]) & set(regions["dicom_id"])
    for d in normal["dicom_id"][:3]:
        with np.load(built / "raw" / "masks" / f"{d}.npz") as z:
            assert z["regions"].shape[0] == 0
    abnormal = index[
        index[[c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]].eq(1).any(axis=1)
    ]
    assert set(abnormal["dicom_id"]) <= set(regions["dicom_id"])


def test_orientation_and_intensity_of_prepared_images(built):
    """In every prepared image (JPG and DICOM, MONOCHROME1 included) the heart's mass is right of the image centre
    and the lungs are darker than the heart and mediastinum."""
    ds = PreparedDataset(built)
    fmt = pd.read_csv(built / "raw" / "phantom_images.csv", dtype=str, keep_default_na=False).set_index(
        "dicom_id"
    )
    seen = set()
    for i in range(len(ds)):
        d = ds.index.at[i, "dicom_id"]
        img = ds.image(i)
        with np.load(built / "raw" / "masks" / f"{d}.npz") as z:
            anatomy = z["anatomy"]
        heart = anatomy[2]
        assert np.nonzero(heart)[1].mean() / SIZE > 0.5
        lungs = (anatomy[0] | anatomy[1]) & ~heart & ~anatomy[3]
        centre = heart | anatomy[3]
        assert img[lungs].mean() < img[centre].mean() - 300, d  # in [-1024, 1024] units
        seen.add(fmt.at[d, "format"])
    assert seen == {"jpg", "MONOCHROME1", "MONOCHROME2"}


def test_contact_sheet(built):
    sheet = Image.open(built / "contact_sheet.png")
    assert sheet.width == 4 * 256 and sheet.height >= 256


# --- determinism and arguments ------------------------------------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_workers(built, tmp_path):
    again = tmp_path / "again"
    prepare_phantom(again, studies=STUDIES, size=SIZE, seed=SEED, workers=2)
    assert _tree_digest(built / "raw") == _tree_digest(again / "raw")
    assert (built / "index.csv").read_bytes() == (again / "index.csv").read_bytes()
    assert (built / "regions.csv").read_bytes() == (again / "regions.csv").read_bytes()
    assert np.array_equal(np.load(built / "images.npy"), np.load(again / "images.npy"))


def test_other_seed_other_phantom(built, tmp_path):
    other = tmp_path / "other"
    prepare_phantom(other, studies=8, size=64, seed=1)
    a = _read_gz(built / "raw" / "mimic-cxr-2.0.0-metadata.csv.gz")
    b = _read_gz(other / "raw" / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert not set(a["dicom_id"]) & set(b["dicom_id"])
    assert read_index(other)["dicom_id"].size == 8
    # Rerunning with the same arguments reuses the tree; other arguments on the same folder are refused.
    prepare_phantom(other, studies=8, size=64, seed=1)
    with pytest.raises(DataError, match="other|IU-Phantom built with"):
        prepare_phantom(other, studies=8, size=64, seed=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 32}, "64 to 1024"),
        ({"studies": 0}, "positive"),
        ({"studies": 100_000}, "only 3927"),
        ({"seed": -1}, "non-negative"),
        ({"workers": 0}, "at least 1"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        prepare_phantom(tmp_path / "x", **{"studies": 4, "size": 64, **kwargs})


def test_an_interrupted_build_starts_again(tmp_path):
    raw = tmp_path / "ph" / "raw"
    (raw / "files" / "p19").mkdir(parents=True)
    (raw / "files" / "p19" / "stale.jpg").write_bytes(b"half written")
    (raw / ".phantom_building.json").write_text("{}")
    prepare_phantom(tmp_path / "ph", studies=4, size=64)
    assert not (raw / "files" / "p19" / "stale.jpg").exists()
    assert (raw / "phantom.json").exists() and not (raw / ".phantom_building.json").exists()


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_phantom(tmp_path, studies=4, size=64)


# --- planning and drawing -------------------------------------------------------------------------------------------


def _plan(text: str, seed: int = 0) -> list[DrawSpec]:
    return plan_findings(extract_mentions(text), np.random.default_rng(seed))


def test_plan_follows_the_report():
    (e,) = _plan("Small left pleural effusion.")
    assert (e.kind, e.side, e.zone, e.severity) == (Finding.EFFUSION, Side.LEFT, Zone.BASE, "small")
    assert {s.side for s in _plan("Bilateral pleural effusions.")} == {Side.LEFT, Side.RIGHT}
    (n,) = _plan("There is a 1 cm nodule in the right upper lobe.")
    assert (n.kind, n.side, n.zone) == (Finding.NODULE, Side.RIGHT, Zone.UPPER)
    (r,) = _plan("Retrocardiac opacity.")
    assert (r.side, r.zone) == (Side.LEFT, Zone.RETROCARDIAC)
    (c,) = _plan("The heart is enlarged.")
    assert c.kind == Finding.CARDIOMEGALY and c.side is None and c.zone is None
    (p,) = _plan("Left-sided pacemaker in place.")
    assert (p.kind, p.device, p.side) == (Finding.DEVICE, Device.PACEMAKER, Side.LEFT)
    (w,) = _plan("Median sternotomy wires.")
    assert w.device == Device.STERNAL_WIRES and w.side is None
    assert 2 <= len(_plan("Calcified granulomas in the left lung.")) <= 3
    # One finding mentioned twice is drawn once; negated and uncertain mentions are not drawn.
    assert len(_plan("Small left effusion. Left pleural effusion again noted.")) == 1
    assert _plan("No pneumothorax, effusion or focal consolidation. Heart size normal.") == []
    assert _plan("Possible early pneumonia cannot be excluded.") == []


def test_severity_words_are_the_labelers():
    # the drawing's sizes and the merge's ranking (largest stated severity wins) name the same words, in order
    assert tuple(SEVERITY_SCALE) == SEVERITY_ORDER
    assert list(SEVERITY_SCALE.values()) == sorted(SEVERITY_SCALE.values())


def test_default_side_is_recorded_and_seeded():
    sides = {_plan("Pleural effusion.", seed)[0].side for seed in range(12)}
    assert sides == {Side.LEFT, Side.RIGHT}
    assert _plan("Pleural effusion.", 3) == _plan("Pleural effusion.", 3)


def test_stated_sides_leave_out_what_the_phantom_chose():
    def stated(text: str) -> set[tuple[str, str]]:
        return stated_sides(extract_mentions(text))

    assert stated("Pleural effusion.") == set()  # drawn on a random side: the report does not say which
    assert stated("Small left pleural effusion.") == {("effusion", "left")}
    assert stated("Bilateral pleural effusions.") == {("effusion", "left"), ("effusion", "right")}
    assert stated("Retrocardiac opacity.") == {("opacity", "left")}
    assert stated("The heart is enlarged.") == set()  # central: no side
    assert stated("Pacemaker in place.") == set()  # a device's default side is a convention, not the report's
    assert stated("Left-sided pacemaker in place.") == {("device", "left")}
    # a later sideless mention joins the sided one, as in plan_findings
    assert stated("Small right effusion. The effusion is unchanged.") == {("effusion", "right")}
    assert stated("No left effusion.") == set()
    # every stated side is one plan_findings draws, whatever the seed
    text = "Right lower lobe opacity. Pleural effusion. Left-sided pacemaker."
    for seed in range(5):
        drawn = {(s.finding or s.kind.value, s.side.value) for s in _plan(text, seed) if s.side}
        assert stated(text) <= drawn and ("opacity", "right") in drawn


@pytest.fixture(scope="module")
def atlas():
    return load_lung_atlas()


def test_atlas_skips_empty_masks(atlas):
    reasons = [r for _, r in atlas.skipped]
    assert reasons.count("empty mask") == 82
    assert 420 <= len(atlas) <= 435 and len(atlas) + len(atlas.skipped) == 517
    assert atlas.masks.shape[1:] == (224, 224) and atlas.masks.dtype == np.uint8


@pytest.mark.parametrize("kind", [k for k in Finding if k not in (Finding.DEVICE,)])
def test_every_kind_is_drawn_where_asked(atlas, kind):
    lesions = lesion_diameters()
    central = kind in (Finding.CARDIOMEGALY, Finding.ENLARGED_CARDIOMEDIASTINUM, Finding.EDEMA)
    zones = [None] if central else sorted(ALLOWED_ZONES.get(kind, set(Zone)), key=lambda z: z.value)[:3]
    for i, (side, zone) in enumerate((s, z) for s in (Side.LEFT, Side.RIGHT) for z in zones):
        if zone == Zone.RETROCARDIAC:
            side = Side.LEFT
        spec = DrawSpec(kind, None if central else side, zone, "moderate", finding=kind.value)
        fr = render_frontal([spec], atlas, (7 * i + 3) % len(atlas), SIZE, np.random.default_rng(i), lesions)
        assert fr.regions, spec
        for r in fr.regions:
            row = pd.Series(
                {
                    "finding": kind.value,
                    "side": r.spec.side.value if r.spec.side else "",
                    "zone": r.spec.zone.value if r.spec.zone else "",
                    "x0": r.box[0],
                    "y0": r.box[1],
                    "x1": r.box[2],
                    "y1": r.box[3],
                }
            )
            _check_box(row, fr.anatomy)
            assert r.mask.sum() >= 4  # visible: at least a few pixels at 128 px
        if kind == Finding.EDEMA:
            assert {r.spec.side for r in fr.regions} == {Side.LEFT, Side.RIGHT}


def test_findings_change_the_pixels(atlas):
    """A drawn finding is visible: the image differs inside its region from the same image drawn without it."""
    lesions = lesion_diameters()
    for kind, side, zone in [
        (Finding.EFFUSION, Side.LEFT, Zone.BASE),
        (Finding.NODULE, Side.RIGHT, Zone.MID),
        (Finding.PNEUMOTHORAX, Side.RIGHT, Zone.APEX),
        (Finding.CONSOLIDATION, Side.LEFT, Zone.LOWER),
    ]:
        spec = DrawSpec(kind, side, zone, "moderate")
        with_f = render_frontal([spec], atlas, 5, SIZE, np.random.default_rng(9), lesions)
        without = render_frontal([], atlas, 5, SIZE, np.random.default_rng(9), lesions)
        m = with_f.regions[0].mask
        diff = np.abs(with_f.image.astype(int) - without.image.astype(int))
        assert diff[m].mean() > 12, kind  # grey levels out of 255
        assert diff[~m].mean() < diff[m].mean() / 3


def test_devices_are_drawn(atlas):
    lesions = lesion_diameters()
    for i, dev in enumerate(Device):
        side = Side.LEFT if i % 2 else Side.RIGHT
        fr = render_frontal(
            [DrawSpec(Finding.DEVICE, side, device=dev)], atlas, i, SIZE, np.random.default_rng(i), lesions
        )
        assert len(fr.regions) == 1, dev
        assert fr.image[fr.regions[0].mask].mean() > 140, dev  # metal is bright


def test_meta_marks_the_source(built):
    text = (built / "meta.json").read_text()
    assert '"iu-phantom"' in text
    assert re.search(r'"seed": 0', text)
    assert gzip.open(built / "raw" / "mimic-cxr-2.0.0-split.csv.gz").read().startswith(b"dicom_id,study_id")

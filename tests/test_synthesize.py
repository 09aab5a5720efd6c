"""``medvl synthesize``: reports in, PNG or a synthetic-marked DICOM out; bad reports refused."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from medvl.errors import InvalidReportError
from medvl.inference.synthesize import (
    Synthesizer,
    check_report,
    synthesize_command,
    write_png,
    write_synthetic_dicom,
)
from tests.models.diffusion_fixtures import build_tiny_runs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tiny_prepared, tmp_path_factory):
    return build_tiny_runs(tmp_path_factory.mktemp("synth_runs"), tiny_prepared)["diff"]


@pytest.mark.parametrize("report", ["", "   ", "\n\t  \n"])
def test_empty_or_whitespace_report_is_a_clear_error(report, run, tmp_path):
    with pytest.raises(InvalidReportError, match="empty"):
        check_report(report)
    with pytest.raises(InvalidReportError, match="empty"):
        synthesize_command(report, run=run, out=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_reports_an_empty_report_in_one_line(run, tmp_path, capsys, monkeypatch):
    import medvl.api as api
    from medvl.cli import main

    monkeypatch.setattr(api, "synthesize_command", synthesize_command, raising=False)
    assert main(["synthesize", "  ", "--run", str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty" in err[0]


def test_synthesize_png_same_seed_same_image(run, tmp_path):
    report = "Small right pleural effusion. No pneumothorax."
    assert synthesize_command(report, run=run, out=tmp_path / "a.png", seed=5, steps=3) == 0
    assert synthesize_command(report, run=run, out=tmp_path / "b.png", seed=5, steps=3) == 0
    assert synthesize_command(report, run=run, out=tmp_path / "c.png", seed=6, steps=3) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    info = json.loads(Image.open(tmp_path / "a.png").text["medvl"])
    assert info["synthetic"] is True and info["seed"] == 5 and info["steps"] == 3
    assert "report" not in info and len(info["report_sha256"]) == 64  # no report text in the file
    with pytest.raises(ValueError, match="png or .dcm"):
        synthesize_command(report, run=run, out=tmp_path / "a.jpg")


def test_synthetic_dicom_has_no_patient_data_and_reads_back(run, tmp_path, real_fixtures):
    real = pydicom.dcmread(real_fixtures / "RG1_J2KI.dcm")
    out = tmp_path / "synthetic.dcm"
    assert synthesize_command("Cardiomegaly. No focal consolidation.", run=run, out=out, seed=1, steps=3) == 0
    ds = pydicom.dcmread(out)
    # marked synthetic
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert "SYNTHETIC" in ds.SeriesDescription.upper() and ds.ConversionType == "SYN"
    assert ds.BurnedInAnnotation == "NO" and "synthetic" in ds.ImageComments.lower()
    # no patient data: the patient module is present and empty, identity removed
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        assert str(ds.get(keyword, "")) == ""
    assert ds.PatientIdentityRemoved == "YES"
    # nothing of a real study leaks in (the writer never reads one): none of its identifying values appear
    raw = out.read_bytes()
    for tag in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "AccessionNumber",
        "InstitutionName",
        "StudyID",
        "ReferringPhysicianName",
    ):
        value = str(real.get(tag, "") or "").strip()
        if len(value) >= 3:
            assert value.encode() not in raw, tag
    # fresh UIDs every time
    out2 = tmp_path / "again.dcm"
    synthesize_command("Cardiomegaly. No focal consolidation.", run=run, out=out2, seed=1, steps=3)
    ds2 = pydicom.dcmread(out2)
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert ds.get(uid) != ds2.get(uid) and str(ds.get(uid)) != str(real.get(uid))
    # the same pixels (seed 1) as the PNG path, and readable by medvl's own reader
    from medvl.data.images import read_xray

    pixels = read_xray(out)
    synth = Synthesizer.load(run)
    expected = synth.synthesize(["Cardiomegaly. No focal consolidation."], seed=1, steps=3)[0, 0].numpy()
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).max() <= 2048 / 4095 + 1e-3  # 12-bit quantisation


def test_dicom_writer_keeps_left_on_the_left(tmp_path):
    from medvl.data.images import read_xray

    image = torch.full((1, 48, 64), -1000.0)
    image[..., :, :16] = 1000.0  # bright band on the image's left
    back = read_xray(write_synthetic_dicom(image, tmp_path / "o.dcm"))
    assert back.shape == (48, 64)
    assert back[:, :16].mean() > 900 and back[:, 32:].mean() < -900
    png = np.asarray(Image.open(write_png(image, tmp_path / "o.png")))
    assert png[:, :16].mean() > 250 and png[:, 32:].mean() < 5

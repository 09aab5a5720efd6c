"""``medvl generate-report`` on many scans: folders, CSV inputs, ``--out`` CSV / JSON lines with DICOM UIDs, one
explanation per scan, error rows that let the rest go on, and one DICOM SR per study (tiny report run; the reports'
content is meaningless here, the plumbing is what is tested)."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import generate_uid

from medvl.cli import main
from medvl.data.dicom import write_dicom
from medvl.data.testing import chest_dataset, synthetic_chest, write_jpg, write_png
from medvl.inference.generate import (
    OUTPUT_COLUMNS,
    GeneratedReport,
    ReportGenerator,
    ScanResult,
    UsedKeyword,
    collect_scans,
    output_row,
)
from medvl.inference.sr import check_basic_text_sr, read_sr_text
from tests.models.report_fixtures import tiny_runs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("report_runs"), tiny_prepared)


def dicom(path, study: str, seed: int) -> pydicom.Dataset:
    ds = chest_dataset(synthetic_chest(60, 52, seed=seed))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    write_dicom(ds, path)
    return ds


@pytest.fixture
def folder(tmp_path):
    """Ten readable scans (two DICOM studies, PNG, JPG, nested, upper-case suffix) and three bad ones (corrupt,
    empty, not a chest)."""
    root = tmp_path / "scans"
    study_a, study_b = generate_uid(), generate_uid()
    sources = {
        "a/pa.dcm": dicom(root / "a" / "pa.dcm", study_a, 1),
        "a/lat.dcm": dicom(root / "a" / "lat.dcm", study_a, 2),
        "b/x.dcm": dicom(root / "b" / "x.dcm", study_b, 3),
    }
    for k in range(4):
        write_png(root / "png" / f"n{k}.png", synthetic_chest(50, 44, seed=10 + k))
    write_jpg(root / "jpg" / "deep" / "j.JPG", synthetic_chest(48, 48, seed=20))
    write_jpg(root / "jpg" / "k.jpeg", synthetic_chest(48, 40, seed=21))
    write_png(root / "png" / "n9.png", synthetic_chest(40, 40, seed=22))
    (root / "bad").mkdir()
    (root / "bad" / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (root / "bad" / "empty.png").write_bytes(b"")
    write_dicom(
        chest_dataset(synthetic_chest(40, 40), modality="CT", body_part="HEAD"), root / "bad" / "head.dcm"
    )
    (root / "notes.txt").write_text("not a scan")
    return {"root": root, "sources": sources, "studies": (study_a, study_b)}


def test_collect_scans(folder, tmp_path):
    root = folder["root"]
    found = collect_scans([root])
    assert len(found) == 13 and all(p.suffix.lower() in (".dcm", ".png", ".jpg", ".jpeg") for p in found)
    assert found == sorted(found) and root / "jpg" / "deep" / "j.JPG" in found
    pd.DataFrame({"path": ["a/pa.dcm", str(root / "png" / "n0.png"), "gone.png"]}).to_csv(
        root / "list.csv", index=False
    )
    assert collect_scans([root / "list.csv"], image_column="path") == [
        root / "a" / "pa.dcm",
        root / "png" / "n0.png",
        root / "gone.png",
    ]
    with pytest.raises(ValueError, match="no column 'image'.*--image-column"):
        collect_scans([root / "list.csv"])
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="no scans found"):
        collect_scans([tmp_path / "void"])


def test_folder_to_csv_with_explanations_and_sr(runs, folder, tmp_path, capsys):
    root, sources = folder["root"], folder["sources"]
    out, explain, sr = tmp_path / "reports.csv", tmp_path / "explain", tmp_path / "sr"
    code = main(
        ["generate-report", str(root), "--run", str(runs.report), "--beams", "1"]
        + ["--out", str(out), "--explain-dir", str(explain), "--sr", str(sr)]
    )
    err = capsys.readouterr().err
    assert code == 2  # two scans could not be read
    assert "generate-report: 100%" in err and "13/13" in err  # the progress bar, on stderr
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert tuple(table.columns) == OUTPUT_COLUMNS and len(table) == 13  # more than one batch of 8
    rows = table.set_index("input")
    bad = rows.loc[[str(root / "bad" / n) for n in ("corrupt.dcm", "empty.png", "head.dcm")]]
    assert list(bad["status"]) == ["error"] * 3 and list(bad["report"]) == [""] * 3
    assert "empty file" in bad["error"].iloc[1] and "not a chest" in bad["error"].iloc[2]
    good = rows[rows["status"] == "ok"]
    assert len(good) == 10 and (good["error"] == "").all() and (good["report"].str.strip() != "").all()
    for name, ds in sources.items():
        row = rows.loc[str(root / name)]
        assert (row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]) == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
        )
    png_row = rows.loc[str(root / "png" / "n0.png")]
    assert png_row["sop_instance_uid"] == "" and float(png_row["score"]) <= 0.0
    # One explanation PNG per readable scan, named by its position among the inputs.
    pngs = sorted(explain.glob("*.png"))
    assert len(pngs) == 10 and sorted(good["explanation"]) == [str(p) for p in pngs]
    assert Image.open(pngs[0]).size[0] > 100
    # One SR per DICOM study, holding the reports the table has.
    study_a, study_b = folder["studies"]
    assert sorted(p.name for p in sr.glob("*.dcm")) == sorted([f"{study_a}.dcm", f"{study_b}.dcm"])
    doc = pydicom.dcmread(sr / f"{study_a}.dcm")
    assert check_basic_text_sr(doc) == []
    assert sorted(read_sr_text(doc)) == sorted(
        (sources[n].SOPInstanceUID, rows.loc[str(root / n), "report"]) for n in ("a/pa.dcm", "a/lat.dcm")
    )
    assert "2 DICOM SR document(s)" in err and "7 PNG/JPG scan(s)" in err


def test_csv_input_to_jsonl_all_ok(runs, folder, tmp_path, capsys):
    root = folder["root"]
    pd.DataFrame({"file": ["a/pa.dcm", "png/n1.png"]}).to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "reports.jsonl"
    code = main(
        ["generate-report", str(tmp_path / "in.csv"), "--run", str(runs.report), "--image-column", "file"]
        + ["--image-root", str(root), "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err

    def no_constants(name):
        raise AssertionError(f"{name} in JSON output")

    rows = [json.loads(line, parse_constant=no_constants) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == [str(root / "a" / "pa.dcm"), str(root / "png" / "n1.png")]
    assert all(r["status"] == "ok" and r["report"] and set(r) == set(OUTPUT_COLUMNS) for r in rows)
    assert rows[0]["sop_instance_uid"] == folder["sources"]["a/pa.dcm"].SOPInstanceUID
    assert all(len(k["box"]) == 4 for k in rows[0]["keywords"])
    gen = ReportGenerator.load(runs.report)
    assert rows[1]["report"] == gen.generate([root / "png" / "n1.png"])[0].text  # same as the Python API


def test_non_finite_numbers_are_null_in_json():
    report = GeneratedReport(
        "text", ["text"], float("nan"), [UsedKeyword("effusion", float("inf"), (0, 0, 1, 1))]
    )
    row = output_row(ScanResult("x.png", report=report), as_csv=False)
    text = json.dumps(row, allow_nan=False)
    assert json.loads(text)["score"] is None and json.loads(text)["keywords"][0]["score"] is None
    assert output_row(ScanResult("x.png", report=report), as_csv=True)["keywords"] == "effusion (inf)"
    assert math.isnan(report.score)


def test_bad_arguments(runs, folder, tmp_path, monkeypatch, capsys):
    scan = str(folder["root"] / "png" / "n0.png")
    assert main(["generate-report", scan, "--run", str(runs.report), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".csv or .jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "highdicom", None)
    assert main(["generate-report", scan, "--run", str(runs.report), "--sr", str(tmp_path / "sr")]) == 2
    assert 'pip install "medvl[sr]"' in capsys.readouterr().err
    assert not (tmp_path / "sr").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="forks the reading workers")
def test_workers_read_the_same_and_a_crash_is_an_error_row(runs, folder, tmp_path, capsys, monkeypatch):
    """--workers 2 writes the rows one process writes; a scan whose reading kills its worker is an error row
    naming the signal, and the others keep their reports."""
    import faulthandler
    import os
    import signal

    import medvl.inference.scan_reader as scan_reader

    root = folder["root"]
    common = ["generate-report", str(root), "--run", str(runs.report), "--beams", "1"]
    assert main([*common, "--out", str(tmp_path / "one.csv")]) == 2
    assert main([*common, "--out", str(tmp_path / "two.csv"), "--workers", "2"]) == 2
    one = pd.read_csv(tmp_path / "one.csv", dtype=str, keep_default_na=False)
    two = pd.read_csv(tmp_path / "two.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(one, two)

    real, victim = scan_reader.read_scan_file, root / "png" / "n1.png"

    def crashing(path, size, **kwargs):
        if str(path) == str(victim):
            faulthandler.disable()
            os.kill(os.getpid(), signal.SIGSEGV)  # reaches the forked workers, as a decoder's crash would
        return real(path, size, **kwargs)

    monkeypatch.setattr(scan_reader, "read_scan_file", crashing)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "crash.csv"), "--workers", "2"]) == 2
    crash = pd.read_csv(tmp_path / "crash.csv", dtype=str, keep_default_na=False).set_index("input")
    row = crash.loc[str(victim)]
    assert (
        row["status"] == "error"
        and "reading it ended its worker process (crashed with SIGSEGV)" in row["error"]
    )
    # the others: the same statuses and errors, and a report for each readable one
    others, rest = one.set_index("input").drop(index=str(victim)), crash.drop(index=str(victim))
    pd.testing.assert_frame_equal(rest[["status", "error"]], others[["status", "error"]])
    assert (rest.loc[rest["status"] == "ok", "report"].str.strip() != "").all()


def _run_with_data_meta(run, tmp_path, **meta):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info = json.loads((copy / "stage.json").read_text())
    info.setdefault("data", {}).setdefault("meta", {}).update(meta)
    (copy / "stage.json").write_text(json.dumps(info))
    return copy


def test_dicoms_are_read_as_the_runs_training_data_were(runs, folder, tmp_path, monkeypatch, capsys):
    """A run trained on a dataset prepared with --jpg-compatible reads DICOMs that way at inference too;
    --no-jpg-compatible overrides it; a run trained on JPGs only is told about the flag when given DICOMs."""
    import medvl.inference.generate as generate
    from medvl.data.scans import load_scan

    scan = folder["root"] / "a" / "pa.dcm"
    assert ReportGenerator.load(runs.report).jpg_compatible is False
    run = _run_with_data_meta(runs.report, tmp_path, jpg_compatible=True)
    gen = ReportGenerator.load(run)
    assert gen.jpg_compatible is True
    as_jpg = load_scan(scan, gen.image_size, jpg_compatible=True)
    assert torch.equal(gen.read([scan])[0], as_jpg)
    assert not torch.equal(as_jpg, load_scan(scan, gen.image_size))

    seen = []
    real = generate.ScanReader

    def recording(size, workers=1, jpg_compatible=False):
        seen.append(jpg_compatible)
        return real(size, workers, jpg_compatible)

    monkeypatch.setattr(generate, "ScanReader", recording)
    out = ["--out", str(tmp_path / "r.csv")]
    assert main(["generate-report", str(scan), "--run", str(run), *out]) == 0
    assert main(["generate-report", str(scan), "--run", str(run), "--no-jpg-compatible", *out]) == 0
    assert seen == [True, False]
    jpg_run = _run_with_data_meta(runs.report, tmp_path / "j", image_files={"jpg": 40})
    capsys.readouterr()
    assert main(["generate-report", str(scan), "--run", str(jpg_run), *out]) == 0
    assert "trained on JPGs only; --jpg-compatible reads the DICOMs" in capsys.readouterr().err


def test_device_is_cuda_when_available_unless_named(runs, folder, tmp_path, monkeypatch):
    """generate-report runs its models on CUDA when there is one (as synthesize does); --device names another."""
    import medvl.inference.generate as generate

    seen = []
    real = generate.ReportGenerator.load

    def recording(run, device="cpu"):
        seen.append(device)
        return real(run, device="cpu")  # no GPU here: the models load on the CPU whatever was asked

    monkeypatch.setattr(generate.ReportGenerator, "load", staticmethod(recording))
    scan, out = folder["root"] / "a" / "pa.dcm", ["--out", str(tmp_path / "r.csv")]
    assert main(["generate-report", str(scan), "--run", str(runs.report), *out]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["generate-report", str(scan), "--run", str(runs.report), *out]) == 0
    assert main(["generate-report", str(scan), "--run", str(runs.report), "--device", "cpu", *out]) == 0
    assert [str(d) for d in seen] == ["cpu", "cuda", "cpu"]


def test_a_device_this_machine_lacks_is_a_clear_error(runs, folder, tmp_path, monkeypatch, capsys):
    scan, out = folder["root"] / "a" / "pa.dcm", tmp_path / "r.csv"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, says in (("gpu", "is not a device: use cpu, cuda or cuda:N"), ("cuda", "has no CUDA device")):
        capsys.readouterr()
        argv = [
            "generate-report",
            str(scan),
            "--run",
            str(runs.report),
            "--device",
            device,
            "--out",
            str(out),
        ]
        assert main(argv) == 2
        assert says in capsys.readouterr().err and not out.exists()  # refused before anything was written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["generate-report", str(scan), "--run", str(runs.report), "--device", "cuda:3", "--out", str(out)]
    assert main(argv) == 2 and "has 1 CUDA device(s)" in capsys.readouterr().err

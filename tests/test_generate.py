"""``generate-report`` on real files (NIH PNG, RG1 JPEG 2000 DICOM) with a tiny run trained on the toy data.

The reports are meaningless here (a few training steps on 48 toy images, applied to real scans): these
tests check the plumbing (reading, batching, JSON, errors, explanation image), not the content.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medvl.data.scans import load_scan
from medvl.inference.generate import GeneratedReport, ReportGenerator, generate_report_command
from medvl.text.chexpert import CHEXPERT_LABELS
from tests.models.report_fixtures import tiny_runs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("report_runs"), tiny_prepared)


def test_generate_report_json_on_real_png_and_dicom(runs, real_fixtures, capsys):
    scans = [real_fixtures / "nih_00000001_000.png", real_fixtures / "RG1_J2KI.dcm"]
    rc = generate_report_command(scans, run=runs.report, beams=2, explain=None, as_json=True)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    records = json.loads(captured.out)
    assert [r["scan"] for r in records] == [str(s) for s in scans]
    for rec in records:
        assert isinstance(rec["report"], str) and rec["report"].strip()
        assert set(rec["labels"]) == set(CHEXPERT_LABELS)
        assert all(v in (None, 1.0, 0.0, -1.0) for v in rec["labels"].values())
        assert 0 < len(rec["keywords"]) <= 4
        for kw in rec["keywords"]:
            assert isinstance(kw["word"], str) and len(kw["box"]) == 4
            x0, y0, x1, y1 = kw["box"]
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert rec["score"] <= 0.0


def test_corrupt_file_among_several(runs, real_fixtures, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    missing = tmp_path / "nowhere.dcm"
    scans = [real_fixtures / "nih_00027426_000.png", bad, missing, real_fixtures / "RG1_J2KI.dcm"]
    out_png = tmp_path / "explain.png"
    rc = generate_report_command(scans, run=runs.report, beams=1, explain=out_png, as_json=True)
    captured = capsys.readouterr()
    assert rc == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("medvl: error:")]
    assert len(errors) == 2 and "broken.png" in errors[0] and "nowhere.dcm" in errors[1]
    records = json.loads(captured.out)
    assert [("error" in r) for r in records] == [False, True, True, False]
    assert records[0]["report"] and records[3]["report"]
    # The explanation holds one panel per readable scan.
    img = np.asarray(Image.open(out_png))
    assert img.ndim == 3 and img.shape[0] > img.shape[1]


def test_text_output_and_bad_explain_name(runs, real_fixtures, capsys):
    rc = generate_report_command([real_fixtures / "nih_00000001_000.png"], run=runs.report, beams=1)
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("== ") and "keywords:" in out
    with pytest.raises(ValueError, match="png"):
        generate_report_command([real_fixtures / "nih_00000001_000.png"], run=runs.report, explain="x.jpg")


def test_python_api_on_tensors_and_paths(runs, real_fixtures):
    gen = ReportGenerator.load(runs.report)
    scan = load_scan(real_fixtures / "RG1_J2KI.dcm", gen.image_size)
    assert scan.shape == (1, gen.image_size, gen.image_size)
    assert scan.min() >= -1024 and scan.max() <= 1024
    by_tensor = gen.generate(scan[None], beams=2)
    by_path = gen.generate([real_fixtures / "RG1_J2KI.dcm"], beams=2)
    assert isinstance(by_tensor[0], GeneratedReport)
    assert by_tensor[0].text == by_path[0].text and by_tensor[0].tokens == by_path[0].tokens
    with pytest.raises(ValueError, match="images must be"):
        gen.generate(torch.zeros(2, 3, 8, 8))
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="beams must be a positive integer"):
            gen.generate(scan[None], beams=bad)


def test_ablation_run_generates_without_memory(runs, real_fixtures):
    gen = ReportGenerator.load(runs.report / "ablations" / "no_memory")
    assert not gen.head.cfg.use_memory
    assert gen.generate([real_fixtures / "RG1_J2KI.dcm"], beams=1)[0].tokens


def test_not_a_report_run(tmp_path):
    with pytest.raises(ValueError, match="holds no report head"):
        ReportGenerator.load(tmp_path)


def test_cli_generate_report(runs, real_fixtures, capsys):
    from medvl.cli import main

    rc = main(
        [
            "generate-report",
            str(real_fixtures / "RG1_J2KI.dcm"),
            "--run",
            str(runs.report),
            "--beams",
            "2",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)[0]["report"]
    rc = main(
        ["generate-report", str(real_fixtures / "RG1_J2KI.dcm"), "--run", str(runs.report.parent / "nothing")]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_decodes_with_the_runs_beams_unless_told(runs, real_fixtures, capsys):
    from medvl.cli import main

    gen = ReportGenerator.load(runs.report)
    scan = real_fixtures / "RG1_J2KI.dcm"
    assert main(["generate-report", str(scan), "--run", str(runs.report), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)[0]
    assert gen.generation.beams == 2  # the tiny preset's setting, not the old forced 3
    assert default["tokens"] == gen.generate([scan], beams=gen.generation.beams)[0].tokens
    assert default["tokens"] == gen.generate([scan])[0].tokens  # the API's default (and medvl evaluate's)

"""Reports and the CLI: bytes reports are decoded (never labelled as their repr), a CSV field over the csv
module's default limit is labelled, a run-on report of 100,000 characters labels in linear time, and a full disk
during ``medvl prepare`` or a file given as ``--data`` is one line naming the path, exit status 2."""

from __future__ import annotations

import errno
import io
import os
import time

import numpy as np
import pytest

import medvl.cli as cli
import medvl.data.ingest as ingest
from medvl.errors import InvalidReportError
from medvl.text.labeler import label_report, label_reports

REPORT = "Small left pleural effusion. No pneumothorax. Heart size is normal."


def test_bytes_reports_are_decoded_not_labelled_as_their_repr():
    np.testing.assert_equal(label_report(REPORT.encode()), label_report(REPORT))
    got = label_reports([REPORT.encode(), bytearray(b""), REPORT])
    np.testing.assert_array_equal(got[0], got[2])
    assert np.isnan(got[1]).all()  # b"" is an empty report, not the text "b''"
    with pytest.raises(InvalidReportError, match="not UTF-8"):
        label_report(b"\xff\xfe effusion")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_label_a_csv_field_over_the_csv_module_limit(tmp_path, capsys):
    long_report = ("The lungs are clear and there is no focal airspace disease " * 3000) + REPORT
    assert len(long_report) > 131072  # the csv module's default field limit
    path = tmp_path / "reports.csv"
    path.write_text('report\n"' + long_report + '"\n"' + REPORT + '"\n')
    code, out, err = _run(capsys, "label", str(path))
    assert code == 0, err
    rows = out.strip().splitlines()
    expected = label_reports([long_report, REPORT])
    assert len(rows) == 3
    for row, want in zip(rows[1:], expected, strict=True):
        assert row == ",".join("" if np.isnan(v) else str(int(v)) for v in want)


def test_label_a_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("report\nÉpanchement pleural\n".encode("latin-1"))
    code, out, err = _run(capsys, "label", str(path))
    assert code == 2 and err.count("\n") == 1 and str(path) in err and "UTF-8" in err


def test_a_run_on_report_labels_in_linear_time():
    # One sentence with no full stop: findings, lists and negations (quadratic before: 8 minutes for 50,000
    # words). Ten times the text takes about ten times as long (a quadratic labeler: a hundred times); both are
    # timed in CPU seconds, back to back, so that a busy machine does not stretch one of them.
    words = (
        "no focal consolidation pleural effusion or pneumothorax and the heart size is normal with mild "
        "bibasilar atelectasis and a small left pleural effusion, edema, nodule, mass, opacity, fracture, "
    )
    report = (words * (100_000 // len(words) + 1))[:100_000]

    def seconds(text: str) -> float:  # CPU seconds: another process on the machine does not count
        start = time.process_time()
        label_report(text)
        return time.process_time() - start

    short = min(seconds(report[:10_000]) for _ in range(2))
    long = seconds(report)
    labels = label_report(report)
    assert labels["Pleural Effusion"] == 1.0 and labels["Atelectasis"] == 1.0
    assert long < 30 * short, f"10,000 characters {short:.2f} s, 100,000 characters {long:.2f} s"
    assert long < 60, f"{long:.1f} s for 100,000 characters"


def test_prepare_on_a_full_disk_names_the_cache(tmp_path, monkeypatch, capsys):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    out = tmp_path / "prepared"
    with pytest.raises(OSError) as info:
        ingest.build_image_cache(out, ["a.png", "b.png"], size=32)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out / "images.npy")
    code, _, err = _run(
        capsys, "prepare", "phantom", "--out", str(tmp_path / "ph"), "--studies", "2", "--size", "64"
    )
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert code == 2 and "Traceback" not in err and last.startswith("medvl: error: ")
    assert "No space left on device" in last and str(tmp_path / "ph" / "images.npy") in last


def test_prepare_into_a_file_and_train_on_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "prepare", "phantom", "--out", str(tmp_path / "file"), "--studies", "2")
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "file") in err
    code, _, err = _run(
        capsys,
        "train",
        "adamatch",
        "--config",
        "tiny",
        "--data",
        str(tmp_path / "file"),
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and err.count("\n") == 1 and "is a file" in err and "does not exist" not in err


def test_label_stdin_bytes(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe not text")))
    code, _, err = _run(capsys, "label", "-")
    assert code == 2 and "standard input is not UTF-8" in err


def test_bytes_reports_in_the_pipeline_api():
    from medvl.api import Pipeline

    pipe = Pipeline({})  # no run: the report is checked before any model loads
    with pytest.raises(InvalidReportError, match="not UTF-8"):
        pipe.match(np.zeros((32, 32), np.float32), b"\xff\xfe")
    with pytest.raises(InvalidReportError, match="empty"):
        pipe.synthesize(b"   ")

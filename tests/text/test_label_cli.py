"""`medvl label` and labelling the whole IU X-ray report set."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from medvl.cli import main
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import _extract, extract_mentions, label_reports


def _rows(out: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(out)))


def test_label_csv_keeps_order_and_blank_rows(tmp_path, capsys) -> None:
    path = tmp_path / "reports.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "report"])
        w.writerow(["1", "Small left pleural effusion. No pneumothorax."])
        w.writerow(["2", ""])
        w.writerow(["3", "Heart size is normal. Lungs are clear."])
        w.writerow(["4", "Possible right lower lobe pneumonia, with a PICC line in place."])
    assert main(["label", str(path)]) == 0
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    assert rows[0] == list(CHEXPERT_LABELS)
    assert len(rows) == 5
    col = {name: i for i, name in enumerate(CHEXPERT_LABELS)}
    assert rows[1][col["Pleural Effusion"]] == "1" and rows[1][col["Pneumothorax"]] == "0"
    assert rows[1][col["No Finding"]] == ""
    assert rows[2] == [""] * 14
    assert "row 2: empty report" in captured.err
    assert rows[3][col["No Finding"]] == "1" and rows[3][col["Cardiomegaly"]] == "0"
    assert rows[4][col["Pneumonia"]] == "-1" and rows[4][col["Support Devices"]] == "1"
    assert set(v for r in rows[1:] for v in r) <= {"", "1", "0", "-1"}


def test_label_stdin(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Moderate cardiomegaly.\nNo effusion.\n"))
    assert main(["label", "-"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 2
    assert rows[1][CHEXPERT_LABELS.index("Cardiomegaly")] == "1"
    assert rows[1][CHEXPERT_LABELS.index("Pleural Effusion")] == "0"


def test_label_empty_stdin_writes_a_blank_row(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["label"]) == 0
    captured = capsys.readouterr()
    assert _rows(captured.out)[1] == [""] * 14
    assert "empty report" in captured.err


def test_label_csv_without_report_column(tmp_path, capsys) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("study_id,text\n1,No effusion.\n")
    assert main(["label", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no 'report' column" in err and "study_id, text" in err


def test_label_missing_file(tmp_path, capsys) -> None:
    assert main(["label", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def iu_texts() -> list[str]:
    from medvl.data.reports import iter_iu_reports, report_text

    return [report_text(r, "both") for r in iter_iu_reports()]


def test_all_iu_reports_label_without_error(iu_texts) -> None:
    assert len(iu_texts) == 3955
    labels = label_reports(iu_texts)
    assert labels.shape == (3955, 14) and labels.dtype == np.float32
    values = set(np.unique(labels[~np.isnan(labels)]).tolist())
    assert values <= {1.0, 0.0, -1.0}
    empty = [i for i, t in enumerate(iu_texts) if not t.strip()]
    assert len(empty) == 28 and np.isnan(labels[empty]).all()
    nf = labels[:, CHEXPERT_LABELS.index("No Finding")]
    # IU X-ray is mostly normal studies; No Finding is 1 or blank, never 0.
    assert 0.45 < np.nansum(nf == 1) / len(iu_texts) < 0.75
    assert not (nf == 0).any()
    # Every mention's phrase and head are real text of its report (a sample: the full pass is the benchmark),
    # and the keyword prefilter finds exactly what scanning every phrase pattern finds.
    for text in iu_texts[::40]:
        assert _extract(text, prefilter=True) == _extract(text, prefilter=False)
        for m in extract_mentions(text):
            assert text[m.start : m.end] == m.phrase
            assert m.head is None or m.head in text.lower()
            assert m.value in (1.0, 0.0, -1.0)

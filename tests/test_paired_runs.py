"""benchmarks/paired_runs.py: known answers. Identical arms differ by exactly 0 with a zero-width interval; an arm
that writes the reference reports scores 1.0 and beats a normal-report arm by its whole F1."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
REFS = [
    "There is cardiomegaly. No effusion.",
    "Small left pleural effusion.",
    "The lungs are clear. No acute disease.",
    "Left lower lobe atelectasis.",
    "Mild pulmonary edema and cardiomegaly.",
]
NORMAL = "The heart is normal in size. The lungs are clear. No acute disease."


@pytest.fixture(scope="module")
def paired():
    spec = importlib.util.spec_from_file_location("paired_runs", REPO / "benchmarks" / "paired_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, generated: list[str]) -> str:
    ids = [f"s{i}" for i in range(len(REFS))]
    pd.DataFrame({"study_id": ids, "reference": REFS, "generated": generated}).to_csv(path, index=False)
    return str(path)


def test_identical_arms_differ_by_nothing(paired, tmp_path):
    a = write(tmp_path / "a.csv", REFS[::-1])
    result = paired.main([f"A:{a}", f"B:{a}", "--out", str(tmp_path / "r.json")])
    assert result["difference"]["micro5"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert json.loads((tmp_path / "r.json").read_text())["studies"] == len(REFS)


def test_the_reference_beats_a_normal_report_by_its_whole_f1(paired, tmp_path):
    normal = write(tmp_path / "n.csv", [NORMAL] * len(REFS))
    perfect = write(tmp_path / "p.csv", REFS)
    result = paired.main([f"A:{normal}", f"B:{perfect}", f"B:{perfect}"])
    assert result["arms"]["B"]["micro5"] == 1.0 and result["arms"]["A"]["micro5"] == 0.0
    d = result["difference"]["micro5"]
    assert d["value"] == 1.0 and d["ci"][0] <= 1.0 <= d["ci"][1]


def test_runs_on_other_studies_are_refused(paired, tmp_path):
    a = write(tmp_path / "a.csv", REFS)
    pd.DataFrame({"study_id": ["x"], "reference": ["a"], "generated": ["b"]}).to_csv(
        tmp_path / "b.csv", index=False
    )
    with pytest.raises(SystemExit):
        paired.main([f"A:{a}", f"B:{tmp_path / 'b.csv'}"])


LABELS = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Edema"]


def record(path: Path, probs, positive, hits, studies=None) -> str:
    """A diffusion evaluation record holding only what paired_runs reads: ``meta.scan_scores``."""
    n = len(positive)
    scores = {
        "labels": LABELS,
        "positive": positive,
        "synthesized": probs,
        "studies": studies or [f"s{i}" for i in range(n)],
        "laterality": {"pairs": [[i, 0, i % 2] for i in range(n)], "synthesized": hits},
    }
    path.write_text(json.dumps({"metrics": {"meta": {"scan_scores": scores}}}))
    return str(path)


POSITIVE = [[0, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]]


def test_diffusion_records_a_perfect_arm_beats_a_reversed_one_by_the_whole_range(paired, tmp_path):
    perfect = record(
        tmp_path / "p.json", [[0.1 + 0.8 * v for v in row] for row in POSITIVE], POSITIVE, [1] * 6
    )
    reverse = record(
        tmp_path / "r.json", [[0.9 - 0.8 * v for v in row] for row in POSITIVE], POSITIVE, [0] * 6
    )
    result = paired.main([f"A:{reverse}", f"B:{perfect}", "--out", str(tmp_path / "d.json")])
    assert result["arms"]["B"] == {"cardiomegaly": 1.0, "effusion": 1.0, "macro": 1.0, "laterality": 1.0}
    assert result["arms"]["A"] == {"cardiomegaly": 0.0, "effusion": 0.0, "macro": 0.0, "laterality": 0.0}
    assert result["difference"]["laterality"] == {"value": 1.0, "ci": [1.0, 1.0]}
    flat = tmp_path / "flat.json"  # the file medvl evaluate --out writes: the record itself
    flat.write_text(json.dumps(json.loads(Path(perfect).read_text())["metrics"]))
    same = paired.main([f"A:{perfect}", f"B:{flat}"])
    assert all(d == {"value": 0.0, "ci": [0.0, 0.0]} for d in same["difference"].values())


def test_diffusion_laterality_counts_each_pair_of_a_resampled_scan(paired, tmp_path):
    # Half the pairs right: the point value is 0.5 and resamples move it both ways.
    half = record(tmp_path / "h.json", [[0.5] * 4] * 6, POSITIVE, [1, 0, 1, 0, 1, 0])
    none = record(tmp_path / "n.json", [[0.5] * 4] * 6, POSITIVE, [0] * 6)
    d = paired.main([f"A:{none}", f"B:{half}"])["difference"]["laterality"]
    assert d["value"] == 0.5 and d["ci"][0] < 0.5 < d["ci"][1]


def test_a_diffusion_record_without_per_study_scores_or_mixed_kinds_is_refused(paired, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"metrics": {"meta": {"scan_scores": {"labels": LABELS}}}}))
    with pytest.raises(SystemExit):
        paired.main([f"A:{old}", f"B:{old}"])
    assert "re-run medvl evaluate diffusion" in capsys.readouterr().err
    rec = record(tmp_path / "p.json", [[0.5] * 4] * 5, POSITIVE[:5], [1] * 5)
    csv = write(tmp_path / "a.csv", REFS)
    with pytest.raises(SystemExit):
        paired.main([f"A:{csv}", f"B:{rec}"])

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

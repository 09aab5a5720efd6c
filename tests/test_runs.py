"""Run directories: reading stage.json, finding the runs a set reaches, evaluation records, portable copies.

The runs here are folders with a ``stage.json`` and a file or two: what this module reads, no model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medvl.errors import RunError
from medvl.runs import (
    STAGE_FILE,
    describe_data,
    find_from_run,
    find_runs,
    read_evaluations,
    read_stage_info,
    record_evaluation,
    save_run_set,
    source_runs,
    stage_of,
    stages_of,
)


def _run(path: Path, stage: str, *sources: Path, data: dict | None = None) -> Path:
    path.mkdir(parents=True)
    info = {"stage": stage, "from": [str(s.resolve()) for s in sources], "steps": 3}
    if data is not None:
        info["data"] = data
    (path / STAGE_FILE).write_text(json.dumps(info))
    (path / "config.yaml").write_text(f"stage: {stage}\n")
    (path / "part").mkdir()
    (path / "part" / "config.json").write_text("{}")
    for state in ("checkpoints", "logs", "best"):
        (path / state).mkdir()
        (path / state / "x").write_text("training state")
    return path


@pytest.fixture
def chain(tmp_path):
    a = _run(
        tmp_path / "work" / "am", "adamatch", data={"path": str(tmp_path / "data"), "meta": {"source": "x"}}
    )
    r = _run(tmp_path / "work" / "rep", "report", a)
    ae = _run(tmp_path / "work" / "ae", "autoencoder")
    d = _run(tmp_path / "work" / "diff", "diffusion", a, r, ae)
    # the diffusion run keeps a copy of the autoencoder run inside it, as a run folder of its own
    _run(d / "autoencoder", "autoencoder")
    return {"adamatch": a, "report": r, "autoencoder": ae, "diffusion": d}


def test_read_stage_info_names_the_problem(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        read_stage_info(tmp_path / "nowhere")
    with pytest.raises(RunError, match="not a finished medvl run"):
        read_stage_info(tmp_path)
    (tmp_path / STAGE_FILE).write_text("{oops")
    with pytest.raises(RunError, match="not valid JSON"):
        read_stage_info(tmp_path)
    (tmp_path / STAGE_FILE).write_text("[1, 2]")
    with pytest.raises(RunError, match="names no stage"):
        read_stage_info(tmp_path)
    (tmp_path / STAGE_FILE).write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(RunError, match="not valid JSON"):
        read_stage_info(tmp_path)
    (tmp_path / STAGE_FILE).write_text('"adamatch"')
    with pytest.raises(RunError, match="names no stage"):
        read_stage_info(tmp_path)
    assert stage_of(tmp_path / "nowhere") is None


def test_find_runs_follows_from_and_reads_folders(chain, tmp_path):
    assert find_runs(chain["diffusion"]) == chain
    assert find_runs(chain["report"]) == {"report": chain["report"], "adamatch": chain["adamatch"]}
    assert find_runs(tmp_path / "work") == chain  # a folder of runs (a pipeline folder)
    demo = tmp_path / "demo"
    (demo / "runs").mkdir(parents=True)
    (demo / "runs" / "adamatch").symlink_to(chain["adamatch"])
    assert find_runs(demo) == {"adamatch": demo / "runs" / "adamatch"}
    with pytest.raises(RunError, match="holds no medvl run"):
        find_runs(tmp_path / "work" / "am" / "part")
    with pytest.raises(RunError, match="does not exist"):
        find_runs(tmp_path / "nowhere")


def test_from_runs(chain):
    runs = [chain["report"], chain["adamatch"]]
    assert find_from_run(runs, "adamatch") == chain["adamatch"]
    assert stages_of(runs) == [("report", chain["report"]), ("adamatch", chain["adamatch"])]
    with pytest.raises(RunError, match="needs a finished 'diffusion' run given with --from"):
        find_from_run(runs, "diffusion")
    with pytest.raises(RunError, match="several 'adamatch' runs"):
        find_from_run([chain["adamatch"], chain["adamatch"]], "adamatch")


def test_evaluation_records(tmp_path, chain):
    assert read_evaluations(chain["report"]) == []
    record_evaluation(chain["report"], "report", "test", {"nlg.bleu4": 0.1}, data={"meta": {"source": "x"}})
    record_evaluation(chain["report"], "report", "test", {"nlg.bleu4": 0.2})
    (record,) = read_evaluations(chain["report"])
    assert record == {"kind": "report", "split": "test", "data": {}, "metrics": {"nlg.bleu4": 0.2}}
    assert describe_data(tmp_path) == {"path": str(tmp_path.resolve())}  # not a prepared dataset: no meta
    record_evaluation(
        chain["report"],
        "report",
        "train",
        {"bleu": 0.3, "meta": {"most_frequent_report": "No acute process.", "seed": 0}},
    )
    assert "No acute" not in (chain["report"] / "eval" / "report-train.json").read_text()
    assert read_evaluations(chain["report"])[1]["metrics"] == {"bleu": 0.3, "meta": {"seed": 0}}
    (chain["report"] / "eval" / "report-validate.json").write_text("[]")
    with pytest.raises(RunError, match="report-validate.json is not an evaluation record"):
        read_evaluations(chain["report"])
    (chain["report"] / "eval" / "report-validate.json").write_text("{cut")
    with pytest.raises(RunError, match="report-validate.json is not a readable evaluation record"):
        read_evaluations(chain["report"])


def test_save_run_set_is_portable(chain, tmp_path):
    record_evaluation(
        chain["diffusion"],
        "cyclic",
        "test",
        {"meta": {"runs": {"report": str(chain["report"]), "data": str(tmp_path / "data")}}},
    )
    saved = save_run_set(chain, tmp_path / "pipe")
    assert saved == {stage: tmp_path / "pipe" / stage for stage in chain}
    moved = tmp_path / "elsewhere" / "pipe"
    moved.parent.mkdir()
    (tmp_path / "pipe").rename(moved)
    shutil.rmtree(tmp_path / "work")  # the originals are gone: the folder stands alone
    assert find_runs(moved / "diffusion") == {stage: moved / stage for stage in chain}
    info = read_stage_info(moved / "diffusion")
    assert info["from"] == ["../adamatch", "../report", "../autoencoder"]
    assert source_runs(moved / "diffusion") == [moved / s for s in ("adamatch", "report", "autoencoder")]
    assert read_stage_info(moved / "adamatch")["data"] == {"meta": {"source": "x"}}
    (record,) = read_evaluations(moved / "diffusion")
    assert record["metrics"]["meta"]["runs"] == {"report": "../report", "data": "data"}
    for path in moved.rglob("*"):
        assert path.name not in ("checkpoints", "logs", "best")
        if path.is_file():
            assert str(tmp_path) not in path.read_text(), path
    assert (moved / "diffusion" / "part" / "config.json").is_file()
    assert read_stage_info(moved / "diffusion" / "autoencoder")["from"] == []
    with pytest.raises(RunError, match="one holds the other"):
        save_run_set(find_runs(moved), moved)


def test_loading_a_run_in_the_older_layout_says_which_medvl_reads_it(tmp_path):
    import medvl

    run = _run(tmp_path / "old", "report")
    (run / "adamatch").mkdir()
    (run / "adamatch" / "adamatch.json").write_text("{}")  # the layout medvl 0.1.x wrote
    with pytest.raises(RunError, match=r"saved by medvl 0\.1\.x \(layout 1\)"):
        _ = medvl.load(run).adamatch

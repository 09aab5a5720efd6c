"""End to end: ``run_demo`` on the tiny preset (IU-Phantom of 60 studies at 64 px, tiny configs), then the
Python API, the cyclic metrics, resume, and the HTML report in a real headless browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.browser import check_page


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from medvl.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, preset="tiny")
    return out


def test_demo_writes_every_contract_key(demo_dir):
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    for key in (
        "retrieval.i2t_r1",
        "retrieval.t2i_r5",
        "localization.pointing_game",
        "localization.pointing_game_chance",
        "localization.box_iou",
        "nlg.bleu4",
        "nlg.cider",
        "nlg.rouge_l",
        "ce.micro.f1",
        "ce.micro5.f1",
        "ce.macro.f1",
        "image.fid",
        "image.fid_features",
        "image.label_auroc",
        "image.real_label_auroc",
        "cyclic.report_image_report.ce_f1",
        "cyclic.image_report_image.label_auroc",
        "cyclic.one_way.image_to_report.ce_f1",
        "cyclic.one_way.report_to_image.label_auroc",
        "ablations.layout_none.image.label_auroc",
        "ablations.layout_none.image.laterality_accuracy",
        "grounding.localization.pointing_game",
        "ablations.layout_none.grounding.localization.pointing_game",
        "distilled.image.label_auroc",
        "distilled.image.laterality_accuracy",
    ):
        assert key in metrics, key
    stages = metrics["meta"]["stages"]
    assert set(stages) == {"adamatch", "report", "diffusion", "cyclic", "diffusion_text_only", "distill"}
    assert "consistency, 2 steps" in stages["distill"]["conventions"]["sampling"]  # the student's own sampler
    assert metrics["meta"]["phantom_seed"] == 0
    assert all(m["split"] == "test" and m["num_samples"] > 0 for m in stages.values())
    assert 0.0 <= metrics["cyclic.report_image_report.ce_f1"] <= 1.0


def test_rerun_resumes_instead_of_redoing(demo_dir, capsys):
    from medvl.demo import run_demo

    before = {p: p.stat().st_mtime_ns for p in (demo_dir / "runs").glob("*/stage.json")}
    run_demo(demo_dir, preset="tiny")
    err = capsys.readouterr().err
    assert err.count("already finished, kept") == 14
    assert before == {p: p.stat().st_mtime_ns for p in (demo_dir / "runs").glob("*/stage.json")}


def test_python_api_on_the_demo_runs(demo_dir, tmp_path):
    import medvl
    from medvl.data.prepared import PreparedDataset

    pipe = medvl.load(demo_dir)
    assert {"adamatch", "report", "autoencoder", "diffusion"} <= set(pipe.runs)
    item = PreparedDataset(demo_dir / "data", split="test")[0]
    scan = item["image"][0].numpy()
    rep = pipe.generate_report(scan)
    assert isinstance(rep.text, str)
    reps = pipe.generate_report([scan, scan])
    assert len(reps) == 2 and reps[0].text == rep.text
    syn = pipe.synthesize("Small left pleural effusion.", seed=3)
    again = pipe.synthesize("Small left pleural effusion.", seed=3)
    assert syn.images.shape[:2] == (1, 1)
    assert np.array_equal(syn.images.numpy(), again.images.numpy())
    fast = pipe.synthesize("Small left pleural effusion.", seed=3, sampler="fast")  # the distilled student
    assert fast.sampler.value == "consistency" and fast.steps == 2 and fast.images.shape == syn.images.shape
    exp = pipe.explain(scan, word="effusion", out=tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 0 and exp.word_map is not None
    match = pipe.match(scan, item["report"])
    assert match.words and all(0 <= v <= 1 for w in match.words for v in w.box)
    with pytest.raises(ValueError, match="empty"):
        pipe.match(scan, "   ")


def test_html_report_loads_in_chromium_with_every_image(demo_dir):
    page = demo_dir / "report.html"
    html = page.read_text()
    assert "not clinical models" in html and "cyclic.report_image_report.ce_f1" in html
    result = check_page(page)
    assert result.console_errors == [] and result.page_errors == [] and result.failed_requests == []
    assert result.images >= 6 and result.broken_images == []


def test_evaluate_cli_prints_headline_and_keeps_a_copy_in_the_run(demo_dir, tmp_path, capsys):
    from medvl.cli import main

    out = tmp_path / "adamatch.json"
    assert (
        main(
            [
                "evaluate",
                "adamatch",
                "--run",
                str(demo_dir / "runs" / "adamatch"),
                "--data",
                str(demo_dir / "data"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "retrieval.i2t_r1" in printed and "localization.pointing_game" in printed
    metrics = json.loads(out.read_text())
    kept = json.loads((demo_dir / "runs" / "adamatch" / "eval" / "adamatch-test.json").read_text())
    assert kept["metrics"] == metrics and kept["data"]["meta"]["source"] == "iu-phantom"


def test_pipeline_saved_and_loaded_elsewhere(demo_dir, tmp_path):
    import shutil

    import medvl
    from medvl.data.prepared import PreparedDataset

    pipe = medvl.load(demo_dir)
    folder = pipe.save_pretrained(tmp_path / "saved" / "medvl-phantom")
    moved = tmp_path / "elsewhere" / "medvl-phantom"
    shutil.copytree(folder, moved)
    shutil.rmtree(folder)
    card = (moved / "README.md").read_text()
    assert (
        "demonstrations, not clinical models" in card and 'Pipeline.from_pretrained("medvl-phantom")' in card
    )
    assert "ce.micro.f1" in card and "cyclic.report_image_report.ce_f1" in card and "```yaml" in card
    for path in moved.rglob("*"):
        assert path.name not in ("checkpoints", "logs", "best")
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".txt"):
            text = path.read_text()
            assert str(demo_dir) not in text and str(tmp_path) not in text, path

    again = medvl.Pipeline.from_pretrained(moved)
    assert set(again.runs) == set(pipe.runs) and all(p.parent == moved for p in again.runs.values())
    scan = PreparedDataset(demo_dir / "data", split="test")[0]["image"][0].numpy()
    assert again.generate_report(scan).text == pipe.generate_report(scan).text
    a = again.synthesize("Small left pleural effusion.", seed=1).images
    b = pipe.synthesize("Small left pleural effusion.", seed=1).images
    assert np.array_equal(a.numpy(), b.numpy())


def test_the_page_says_what_a_quick_run_is(demo_dir, tmp_path):
    from medvl.report.html import PRESET_NOTES, write_report

    page = (demo_dir / "report.html").read_text()
    assert "Quick preset" not in page  # a tiny run carries no such line
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    try:
        (demo_dir / "metrics.json").write_text(
            json.dumps({**metrics, "meta": {**metrics["meta"], "preset": "quick"}})
        )
        out = write_report(demo_dir, tmp_path / "quick.html", num_studies=1)
    finally:
        (demo_dir / "metrics.json").write_text(json.dumps(metrics))
    text = out.read_text()
    assert PRESET_NOTES["quick"].split(":")[0] in text and "docs/results.md" in text
    assert f"report head ce.micro5 F1 {metrics['ce.micro5.f1']:.2f} here, 0.53 full" in text


def test_the_quick_page_quotes_the_full_preset_headline_figures():
    from medvl.report.html import FULL_PRESET_FIGURES

    root = Path(__file__).resolve().parents[1]
    headline = json.loads((root / "benchmarks" / "results" / "headline_seed7.json").read_text())
    published = {}
    for row in headline["rows"]:
        published[row["key"]] = row["value"]
        published.update({b["key"]: b["value"] for b in row["baselines"].values()})
    for _, key, full in FULL_PRESET_FIGURES:
        assert round(published[key], 3) == full, key


def test_quick_preset_leaves_the_text_only_ablation_and_the_student_to_the_full_one(tmp_path):
    from medvl.demo.run import build_steps

    quick = [s.name for s in build_steps(tmp_path / "q", "quick")]
    full = [s.name for s in build_steps(tmp_path / "f", "full")]
    assert "train diffusion" in quick and "evaluate cyclic" in quick
    assert not any("text_only" in name or "distill" in name for name in quick)
    assert {"train diffusion_text_only", "evaluate diffusion_text_only"} <= set(full)
    assert {"train distill", "evaluate distill"} <= set(full)
    assert full.index("train distill") > full.index("train diffusion")
    assert set(quick) < set(full)

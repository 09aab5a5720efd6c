"""``medvl report`` on sets of tiny trained runs (the demo's tiny preset): the sections follow the runs given, the
figures come from the runs' logs and evaluation records, and the page loads in headless Chromium with every
image, each shown at the size it was drawn for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvl.cli import main
from medvl.report.figures import read_training_scalars, roc_curve
from tests.browser import check_page
from tests.conftest import one_thread

MIN_LABEL_PX = 11


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from medvl.demo import run_demo

    out = tmp_path_factory.mktemp("report_runs")
    with one_thread():
        run_demo(out, preset="tiny")
    return out


def _report(argv: list[str]) -> int:
    with one_thread():
        return main(["report", *argv])


def test_scan_scores_in_the_diffusion_record_give_its_aurocs(demo_dir):
    record = json.loads((demo_dir / "runs" / "diffusion" / "eval" / "diffusion-test.json").read_text())
    metrics = record["metrics"]
    scores = metrics["meta"]["scan_scores"]
    positive = np.asarray(scores["positive"], dtype=bool)
    assert positive.shape == (metrics["meta"]["num_samples"], 14)
    checked = 0
    for k, name in enumerate(scores["labels"]):
        for series, key in (
            ("real", f"image.real_per_label.{name}.auroc"),
            ("synthesized", f"image.per_label.{name}.auroc"),
        ):
            if key in metrics:
                _, _, auc = roc_curve(np.asarray(scores[series])[:, k], positive[:, k])
                assert abs(auc - metrics[key]) < 1e-6, (
                    key,
                    auc,
                    metrics[key],
                )  # the same float32 probabilities
                checked += 1
    assert checked >= 2
    # Study ids, for study-by-study comparisons of runs (benchmarks/paired_runs.py).
    assert len(scores["studies"]) == len(set(scores["studies"])) == len(positive)


def test_training_scalars_read_from_tensorboard(demo_dir):
    scalars = read_training_scalars(demo_dir / "runs" / "report")
    steps, values = scalars["train/loss"]
    info = json.loads((demo_dir / "runs" / "report" / "stage.json").read_text())
    assert steps[-1] == info["steps"] and np.isfinite(values).all()
    assert "val/val_loss" in scalars
    assert read_training_scalars(demo_dir / "data") == {}  # no logs/: nothing, no error


def test_report_cli_on_a_subset_of_runs_in_chromium(demo_dir, tmp_path, capsys):
    out = tmp_path / "page.html"
    runs = demo_dir / "runs"
    code = _report(
        ["--runs", str(runs / "adamatch"), str(runs / "diffusion"), "--data", str(demo_dir / "data"),
         "--out", str(out), "--studies", "2", "--title", "two runs"]
    )  # fmt: skip
    assert code == 0 and str(out) in capsys.readouterr().out
    page = out.read_text()
    assert "generated report" not in page  # no report run given: no report section, nor its metrics
    assert "nlg.bleu4" not in page
    for text in (
        "Training curves",
        "pointing game per finding word",
        "ROC per label",
        "synthesized from the reference",
    ):
        assert text in page, text
    assert "retrieval.i2t_r1" in page and "image.label_auroc" in page  # the runs' evaluation records
    assert "not clinical models" in page
    result = check_page(out)
    assert result.title == "two runs"
    assert result.console_errors == [] and result.page_errors == [] and result.failed_requests == []
    assert result.broken_images == []
    alts = [img["alt"] for img in result.shown]
    assert "ROC curves per label, real and synthesized scans" in alts
    assert "pointing game per finding word" in alts
    assert sum(a.startswith("training curves") for a in alts) == 2
    assert sum(a.startswith("keypatch") for a in alts) >= 1  # crops cut from the prepared dataset's scans
    for img in result.shown:
        assert img["css"] == img["attr"] and img["natural"] >= img["css"], img
        assert img["label_px"] == 0 or img["label_px"] * img["css"] / img["attr"] >= MIN_LABEL_PX, img


def test_report_on_every_run_and_on_one_alone(demo_dir, tmp_path):
    runs = demo_dir / "runs"
    full = tmp_path / "full.html"
    assert _report(["--runs", *(str(runs / s) for s in ("adamatch", "report", "autoencoder", "diffusion")),
                    "--data", str(demo_dir / "data"), "--out", str(full), "--studies", "1"]) == 0  # fmt: skip
    page = full.read_text()
    assert "generated report" in page and "nlg.bleu4" in page and "cyclic.report_image_report.ce_f1" in page
    alone = tmp_path / "autoencoder.html"
    assert (
        _report(["--runs", str(runs / "autoencoder"), "--data", str(demo_dir / "data"), "--out", str(alone)])
        == 0
    )
    page = alone.read_text()
    assert "<h2>Studies</h2>" not in page and "autoencoder (autoencoder)" not in page  # no study for it
    assert page.count("training curves of the autoencoder run") == 1
    assert "No evaluation kept in these runs" in page
    assert check_page(alone).broken_images == []


def test_report_of_a_saved_pipeline_folder_says_it_has_no_logs(demo_dir, tmp_path):
    import medvl

    folder = medvl.load(demo_dir).save_pretrained(tmp_path / "saved")
    out = tmp_path / "saved.html"
    assert _report(["--runs", str(folder), "--out", str(out)]) == 0  # no --data: no studies
    page = out.read_text()
    assert (
        page.count("no TensorBoard logs in the run") == 5
    )  # adamatch, report, autoencoder, diffusion, distill
    assert "<h2>Studies</h2>" not in page and "ROC per label" in page


def test_keypatch_crops_need_the_dataset_the_bank_was_mined_from(demo_dir, tiny_prepared, tmp_path):
    out = tmp_path / "other.html"
    runs = demo_dir / "runs"
    assert (
        _report(
            [
                "--runs",
                str(runs / "diffusion"),
                "--data",
                str(tiny_prepared),
                "--out",
                str(out),
                "--studies",
                "1",
            ]
        )
        == 0
    )
    page = out.read_text()
    assert "synthesized from the reference" in page  # the studies come from the other dataset
    assert (
        "keypatch crops left out" in page
        and "not the prepared dataset this keypatch bank was mined from" in page
    )
    assert 'alt="keypatch' not in page


def test_two_runs_of_one_stage_are_an_error(demo_dir, tmp_path, capsys):
    runs = demo_dir / "runs"
    code = _report(
        [
            "--runs",
            str(runs / "diffusion"),
            str(runs / "diffusion_text_only"),
            "--out",
            str(tmp_path / "x.html"),
        ]
    )
    assert code == 2 and "two diffusion runs" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()

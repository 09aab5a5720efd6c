"""Known answers for the cyclic scores: a generator and a synthesizer that invert each other close both cycles
(cycle scores 1.0, intervals of zero width), the macro label AUROC takes only labels with enough positives, and
the random-pair reference pairs every study with another."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvl.eval.classifier import ClassifierConfig
from medvl.eval.cyclic import (
    MIN_POSITIVES,
    derangement,
    evaluate_cyclic,
    labels_with_positives,
    run_cycles,
    score_cycles,
)
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.train.classifier import evaluation_classifier
from medvl.train.stages.autoencoder import build_autoencoder_stage
from medvl.train.stages.diffusion import build_diffusion_stage
from tests.models.diffusion_fixtures import finish_run, train_plain
from tests.models.report_fixtures import tiny_runs

REPORTS = [
    "There is cardiomegaly.",
    "Small left pleural effusion.",
    "The lungs are clear.",
    "There is cardiomegaly. There is a pleural effusion.",
]


def _studies(n: int = 40):
    """n studies, scan i a constant image of value i; labels: Cardiomegaly and Pleural Effusion by the report,
    Edema positive in 3 studies only (below the 10 a label needs to enter the macro)."""
    references = [f"{REPORTS[i % len(REPORTS)]} Exam {i}." for i in range(n)]  # each study its own report
    images = np.stack([np.full((1, 8, 8), float(i), np.float32) for i in range(n)])
    labels = np.full((n, 14), np.nan)
    card, eff, edema = (CHEXPERT_LABELS.index(x) for x in ("Cardiomegaly", "Pleural Effusion", "Edema"))
    for i, r in enumerate(references):
        labels[i, card] = 1.0 if "cardiomegaly" in r else np.nan
        labels[i, eff] = 1.0 if "effusion" in r else 0.0
    labels[:3, edema] = 1.0
    studies = [f"s{i // 2}" for i in range(n)]  # two scans per study
    return images, references, labels, studies


class _Features:
    """AdaMatch stand-in: scans by their pixels, reports by a bag of words, R@1 by feature similarity."""

    vocab = sorted({w for r in REPORTS for w in r.lower().replace(".", "").split()} | {"normal"})

    def image_features(self, images):
        x = torch.as_tensor(np.asarray(images)).flatten(1)
        code = torch.stack([torch.cos(x[:, 0] / 7), torch.sin(x[:, 0] / 7), torch.ones(len(x))], 1)
        return F.normalize(code, dim=-1)

    def text_features(self, texts):
        rows = [[float(w in t.lower()) for w in self.vocab] for t in texts]
        return F.normalize(torch.tensor(rows), dim=-1)

    def retrieval_r1(self, images, texts, image_to_text):
        return 1.0


def test_inverse_generator_and_synthesizer_close_both_cycles():
    images, references, labels, studies = _studies()
    by_value = {int(img[0, 0, 0]): references[int(img[0, 0, 0])] for img in images}
    scan_of = {r: images[i] for i, r in enumerate(references)}
    calls = []

    def generate(x):  # the reference report of each (real or drawn) scan
        calls.append("generate")
        return [by_value[int(img[0, 0, 0])] for img in x]

    def synthesize(texts, seed):  # the real scan of each report
        calls.append(("synthesize", seed))
        return np.stack([scan_of[t] for t in texts])

    out = run_cycles(images, references, labels, studies, generate=generate, synthesize=synthesize, seed=3)
    assert calls == [("synthesize", 3), "generate", "generate", ("synthesize", 500_012)]
    assert out.cycle_reports == references and out.generated == references
    # the classifier stand-in reads the labels off the scan it is shown
    truth = np.nan_to_num(labels) == 1

    def probabilities(x):
        return truth[[references.index(scan_report) for scan_report in generate(x)]].astype(np.float32)

    metrics, missing, extra = score_cycles(out, probabilities=probabilities, adamatch=_Features(), seed=0)
    for key in (
        "cyclic.report_image_report.ce_f1",
        "cyclic.report_image_report.ce_micro5_f1",
        "cyclic.one_way.image_to_report.ce_f1",
        "cyclic.image_report_image.label_auroc",
        "cyclic.one_way.report_to_image.label_auroc",
        "cyclic.real.label_auroc",
        "cyclic.image_report_image.adamatch_similarity",
        "cyclic.report_image_report.adamatch_similarity",
    ):
        assert metrics[key] == pytest.approx(1.0), key
    for key in (
        "cyclic.report_image_report.ce_f1_ci",
        "cyclic.one_way.image_to_report.ce_f1_ci",
        "cyclic.image_report_image.label_auroc_ci",
        "cyclic.one_way.report_to_image.label_auroc_ci",
    ):
        assert metrics[key] == [1.0, 1.0], key  # a constant metric: zero width
    assert metrics["cyclic.image_report_image.adamatch_similarity_random_pair"] < 0.9
    assert metrics["cyclic.report_image_report.adamatch_similarity_random_pair"] < 0.9
    # Edema (3 positives) keeps its per-label value but stays out of the macro
    assert extra["labels_used"] == ["Cardiomegaly", "Pleural Effusion"]
    assert extra["label_positives"]["Edema"] == 3 and extra["min_positives"] == MIN_POSITIVES
    assert "cyclic.image_report_image.per_label.Edema.auroc" in metrics
    assert not missing


def test_macro_auroc_without_enough_positives_is_missing_with_its_reason():
    images, references, labels, studies = _studies(12)  # Cardiomegaly 6, effusion 6 positives
    out = run_cycles(
        images,
        references,
        labels,
        studies,
        generate=lambda x: ["The lungs are clear."] * len(x),
        synthesize=lambda texts, seed: images,
    )
    metrics, missing, extra = score_cycles(
        out, probabilities=lambda x: np.random.default_rng(0).random((len(x), 14)), adamatch=_Features()
    )
    assert extra["labels_used"] == []
    assert np.isnan(metrics["cyclic.image_report_image.label_auroc"])
    assert "10 or more positive studies" in missing["cyclic.image_report_image.label_auroc"]
    assert metrics["cyclic.image_report_image.label_auroc_ci"] is None
    assert "cyclic.image_report_image.per_label.Cardiomegaly.auroc" in metrics
    assert labels_with_positives(labels, min_positives=6) == ["Cardiomegaly", "Pleural Effusion"]


def test_derangement_moves_every_item_and_is_seeded():
    for n in (2, 3, 10, 101):
        p = derangement(n, seed=1)
        assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))
    assert np.array_equal(derangement(50, 4), derangement(50, 4))
    assert not np.array_equal(derangement(50, 4), derangement(50, 5))
    assert list(derangement(1)) == [0]


@pytest.mark.usefixtures("single_thread")
def test_evaluate_cyclic_on_tiny_runs_writes_the_keys(tiny_prepared, tmp_path):
    runs = tiny_runs(tmp_path / "report_runs", tiny_prepared)
    ae_stage = build_autoencoder_stage(config_path="tiny", overrides=[], data=tiny_prepared)
    ae = finish_run(ae_stage, train_plain(ae_stage, 2)[0], tmp_path / "ae")
    stage = build_diffusion_stage(
        config_path="tiny", overrides=[], data=tiny_prepared, from_runs=[runs.adamatch, runs.report, ae]
    )
    diffusion = finish_run(stage, train_plain(stage, 2)[0], tmp_path / "diffusion")
    sources = [str(runs.adamatch), str(runs.report), str(ae)]
    (diffusion / "stage.json").write_text(json.dumps({"stage": "diffusion", "from": sources}))
    cfg = ClassifierConfig(image_size=32, channels=[8, 16], steps=30, eval_every=10, batch_size=16, lr=5e-3)
    out = tmp_path / "eval" / "cyclic.json"
    record = evaluate_cyclic(
        run=diffusion,
        data=tiny_prepared,
        out=out,
        steps=2,
        min_positives=2,
        classifier=evaluation_classifier(tiny_prepared, cfg, device="cpu"),
    )
    saved = json.loads(out.read_text())
    assert saved.keys() == record.keys()
    meta = saved["meta"]
    assert meta["num_samples"] == 10 and meta["max_studies"] is None  # every frontal test scan
    assert meta["min_positives"] == 2 and meta["labels_used"]
    assert all(meta["label_positives"][n] >= 2 for n in meta["labels_used"])
    for key in (
        "cyclic.report_image_report.ce_f1",
        "cyclic.image_report_image.label_auroc",
        "cyclic.one_way.image_to_report.ce_f1",
        "cyclic.one_way.report_to_image.label_auroc",
        "cyclic.real.label_auroc",
        "cyclic.image_report_image.adamatch_similarity_random_pair",
        "cyclic.report_image_report.adamatch_similarity_random_pair",
    ):
        assert isinstance(saved[key], float), key
    for key in (
        "cyclic.report_image_report.ce_f1_ci",
        "cyclic.image_report_image.label_auroc_ci",
        "cyclic.one_way.image_to_report.ce_f1_ci",
        "cyclic.one_way.report_to_image.label_auroc_ci",
    ):
        assert saved[key] is None and key in meta["missing"] or saved[key][0] <= saved[key][1], key

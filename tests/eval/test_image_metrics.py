"""``medvl evaluate diffusion``: the metric helpers, and a tiny end-to-end evaluation with the contract's keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvl.eval.classifier import ClassifierConfig
from medvl.eval.image import evaluate_diffusion, mean_ms_ssim, ms_ssim_weights, tune_guidance
from medvl.train.classifier import evaluation_classifier
from tests.models.diffusion_fixtures import build_tiny_runs

TINY_CLASSIFIER = ClassifierConfig(
    image_size=32, channels=[8, 16, 32], steps=40, eval_every=20, batch_size=16, lr=5e-3, min_side_regions=3
)


pytestmark = pytest.mark.usefixtures("single_thread")


def test_ms_ssim_scales_fit_the_image():
    assert len(ms_ssim_weights(256)) == 5
    assert len(ms_ssim_weights(64)) == 3
    assert abs(sum(ms_ssim_weights(32)) - 1) < 1e-9
    rng = np.random.default_rng(0)
    a = rng.uniform(-1024, 1024, (3, 1, 64, 64)).astype(np.float32)
    same, scales = mean_ms_ssim(a, a.copy())
    assert scales == 3 and same == pytest.approx(1.0, abs=1e-5)
    other, _ = mean_ms_ssim(a, rng.uniform(-1024, 1024, a.shape).astype(np.float32))
    assert other < 0.2


def test_evaluate_diffusion_writes_the_contract_keys(tiny_prepared, tmp_path):
    run = build_tiny_runs(tmp_path / "runs", tiny_prepared)["diff"]
    out = tmp_path / "eval" / "diffusion.json"
    classifier = evaluation_classifier(tiny_prepared, TINY_CLASSIFIER, device="cpu")
    record = evaluate_diffusion(
        run=run,
        data=tiny_prepared,
        split="test",
        out=out,
        diversity_reports=4,
        classifier=classifier,
        steps=3,
    )
    saved = json.loads(out.read_text())
    assert saved.keys() == record.keys()
    for key in (
        "image.fid",
        "image.ms_ssim_diversity",
        "image.label_auroc",
        "image.real_label_auroc",
        "image.laterality_accuracy",
        "image.real_laterality_accuracy",
        "image.laterality_accuracy_all_sizes",
        "image.real_per_finding.effusion.laterality_accuracy",
        "image.per_label.Pleural Effusion.auroc",
        "image.real_per_label.Cardiomegaly.auroc",
        "baselines.unconditional.image.label_auroc",
        "baselines.autoencoder_reconstruction.image.label_auroc",
    ):
        assert isinstance(saved[key], float) and np.isfinite(saved[key]), key
    assert saved["image.fid"] >= 0 and 0 <= saved["image.ms_ssim_diversity"] <= 1
    assert saved["image.fid_real_floor"] >= 0  # real validation vs real test scans
    assert saved["baselines.autoencoder_reconstruction.image.fid"] >= 0  # the autoencoder's own blur
    for key in ("image.label_auroc", "image.laterality_accuracy", "image.per_label.Pleural Effusion.auroc"):
        low, high = saved[f"{key}_ci"]
        assert low <= saved[key] <= high, key
    assert saved["image.fid_features"].startswith("medvl-classifier")
    assert saved["image.laterality_pairs"] == saved["image.laterality_pairs_all_sizes"] == 7  # 10 test scans
    assert "image.per_finding.effusion.laterality_accuracy" in saved
    meta = saved["meta"]
    # Per study and per laterality pair, for study-by-study comparisons of runs (benchmarks/paired_runs.py).
    lat = meta["scan_scores"]["laterality"]
    assert len(meta["scan_scores"]["studies"]) == 10 and len(lat["pairs"]) == len(lat["synthesized"]) == 7
    assert np.mean(lat["synthesized"]) == pytest.approx(saved["image.laterality_accuracy"])
    assert np.mean(lat["real"]) == pytest.approx(saved["image.real_laterality_accuracy"])
    assert meta["split"] == "test" and meta["num_samples"] == 10 and meta["config_hash"] is None
    assert "image.laterality_accuracy" in meta["conventions"]
    assert (tmp_path / "eval" / "diffusion.grid.png").stat().st_size > 1000

    # guidance is chosen on the validation split and written into the run
    scores = tune_guidance(run=run, data=tiny_prepared, values=(0.0, 2.0), write=True, classifier=classifier)
    assert set(scores) == {0.0, 2.0}
    from medvl.models.diffusion import load_scheduler_config

    _, sampler = load_scheduler_config(run / "diffusion")
    best = max(scores, key=lambda g: scores[g]["image.label_auroc"] + scores[g]["image.laterality_accuracy"])
    assert sampler.guidance == best


def test_grounding_reads_the_heads_cross_attention_on_real_scans(tiny_prepared, tmp_path):
    import torch

    from medvl.data.prepared import PreparedDataset
    from medvl.eval.grounding import attention_maps, grounding_records
    from medvl.eval.image import read_regions
    from medvl.inference.synthesize import Synthesizer

    synth = Synthesizer.load(build_tiny_runs(tmp_path / "runs", tiny_prepared)["diff"], device="cpu")
    ds = PreparedDataset(tiny_prepared, "test")
    size = synth.image_size
    items = [
        {
            "image": torch.nn.functional.interpolate(ds[i]["image"][None], size=(size, size), mode="area")[0],
            "report": ds[i]["report"],
            "dicom_id": ds[i]["dicom_id"],
        }
        for i in range(len(ds))
    ]
    images = torch.stack([it["image"] for it in items[:3]])
    maps = attention_maps(synth, images, [it["report"] for it in items[:3]])
    # each latent cell's attention is a distribution over the context slots: the maps sum to 1 per scan
    assert maps.shape[:2] == (3, synth.denoiser.conditioner.context_length)
    assert torch.allclose(maps.sum((1, 2, 3)), torch.ones(3), atol=1e-4)
    # the map reads the scan: another scan with the same report moves it
    other = attention_maps(synth, images.flip(0), [it["report"] for it in items[:3]])
    assert not torch.allclose(maps[0], other[0])
    records, _ = grounding_records(synth, items, read_regions(tiny_prepared))
    assert records and all(r.hit in (0.0, 1.0) and 0.0 <= r.chance <= 1.0 for r in records)

"""The evaluation classifier's training: it learns the tiny dataset's labels and sides, is cached per dataset and
config, and an evaluation gets the cached directory."""

from __future__ import annotations

import pytest
import torch

from medvl.eval.classifier import ClassifierConfig, classifier_cache_dir, predict
from medvl.train.classifier import evaluation_classifier, load_or_train_classifier, train_classifier

TINY = ClassifierConfig(
    image_size=32, channels=[8, 16, 32], steps=60, eval_every=20, batch_size=16, lr=5e-3, min_side_regions=3
)


pytestmark = pytest.mark.usefixtures("single_thread")


def test_classifier_trains_on_tiny_data_and_is_cached(tiny_prepared):
    model, report = load_or_train_classifier(tiny_prepared, TINY, device="cpu")
    assert report.side_findings == ["effusion", "nodule", "opacity"]
    assert report.side_convention_agreement == 1.0
    assert report.train_images == 33 and 1 <= report.best_step <= 60
    # The blob templates are easy: validation labels are ranked well above chance.
    assert report.val_macro_auroc > 0.7
    cached, report2 = load_or_train_classifier(tiny_prepared, TINY, device="cpu")
    assert report2 == report
    for a, b in zip(model.state_dict().values(), cached.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    x = torch.zeros(3, 1, 64, 64)
    probs, sides, feats = predict(cached, x)
    assert probs.shape == (3, 14) and sides.shape == (3, 3, 2) and feats.shape == (3, cached.feature_dim)
    # an evaluation gets the cached directory; nothing is trained again
    directory = classifier_cache_dir(tiny_prepared, TINY)
    before = (directory / "model.safetensors").stat().st_mtime_ns
    assert evaluation_classifier(tiny_prepared, TINY) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == before


def test_training_is_deterministic_and_keeps_the_best_validation_step(tiny_prepared):
    cfg = ClassifierConfig(
        image_size=32, channels=[8, 16], steps=12, eval_every=4, batch_size=16, lr=5e-3, min_side_regions=3
    )
    a, report_a = train_classifier(tiny_prepared, cfg, device="cpu")
    b, report_b = train_classifier(tiny_prepared, cfg, device="cpu")
    assert report_a == report_b and report_a.best_step in (4, 8, 12)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert not a.training

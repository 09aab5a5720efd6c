"""The evaluation classifier: trains on tiny real scans, caches, scores sides; the torchxrayvision DenseNet
feature extractor loads local state dicts only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medvl.errors import RunError
from medvl.eval.classifier import (
    ClassifierConfig,
    XrayClassifier,
    XrvDenseNetFeatures,
    fid_extractor,
    label_aurocs,
    laterality_accuracy,
    laterality_pairs,
    load_or_train_classifier,
    one_sided_findings,
    positive_labels,
    predict,
    side_targets,
)
from medvl.text.chexpert import CHEXPERT_LABELS
from tests.models.diffusion_fixtures import one_thread

TINY = ClassifierConfig(image_size=32, channels=[8, 16, 32], steps=60, eval_every=20, batch_size=16, lr=5e-3,
                        min_side_regions=3)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


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


def test_side_head_pools_each_image_half_separately():
    model = XrayClassifier(ClassifierConfig(image_size=32, channels=[8], dropout=0.0), ["effusion"]).eval()
    x = torch.full((1, 1, 32, 32), -1000.0)
    x_right = x.clone()
    x_right[..., 20:28, 20:28] = 1000.0  # a bright blob in the image's right half
    with torch.no_grad():
        base, moved = model(x)[1], model(x_right)[1]
    # only the right-half logit changes (the blob is 4 px away from the midline after one pooling)
    assert torch.equal(base[0, 0, 0], moved[0, 0, 0]) and not torch.equal(base[0, 0, 1], moved[0, 0, 1])


def test_side_targets_and_laterality_pairs():
    regions = pd.DataFrame([
        {"dicom_id": "a", "finding": "effusion", "side": "left", "x0": 0.6, "x1": 0.9, "y0": 0.6, "y1": 0.9},
        {"dicom_id": "b", "finding": "effusion", "side": "right", "x0": 0.1, "x1": 0.4, "y0": 0.6, "y1": 0.9},
        {"dicom_id": "c", "finding": "effusion", "side": "left", "x0": 0.6, "x1": 0.9, "y0": 0.6, "y1": 0.9},
        {"dicom_id": "c", "finding": "effusion", "side": "right", "x0": 0.1, "x1": 0.4, "y0": 0.6, "y1": 0.9},
        {"dicom_id": "d", "finding": "cardiomegaly", "side": "", "x0": 0.3, "x1": 0.7, "y0": 0.4, "y1": 0.8},
    ])
    ids = ["a", "b", "c", "d"]
    assert one_sided_findings(regions, 2) == ["effusion"]
    t = side_targets(regions, ids, ["effusion"])
    assert t[:, 0].tolist() == [[0, 1], [1, 0], [1, 1], [0, 0]]  # patient left is drawn on the image right
    pairs = laterality_pairs(regions, ids, ["effusion"])
    assert pairs == [(0, 0, 1), (1, 0, 0)]  # c has both sides: no stated side
    small = pd.concat([regions, pd.DataFrame([{"dicom_id": "d", "finding": "effusion", "side": "right", "x0": 0.1,
                                               "x1": 0.15, "y0": 0.6, "y1": 0.9}])])
    assert laterality_pairs(small, ids, ["effusion"]) == [(0, 0, 1), (1, 0, 0), (3, 0, 0)]
    assert laterality_pairs(small, ids, ["effusion"], min_side=0.1) == [(0, 0, 1), (1, 0, 0)]  # 0.05 wide
    # only the sides the reports state: b's report gave no side (the phantom chose one), c's says left but c has
    # both sides drawn, d's states the right side
    stated = [{("effusion", "left")}, set(), {("effusion", "left")}, {("effusion", "right")}]
    assert laterality_pairs(small, ids, ["effusion"], stated=stated) == [(0, 0, 1), (3, 0, 0)]
    assert laterality_pairs(small, ids, ["effusion"], stated=[{("effusion", "right")}] * 4) == [(1, 0, 0), (3, 0, 0)]
    logits = np.zeros((4, 1, 2))
    logits[0, 0] = [0.0, 2.0]
    logits[1, 0] = [0.0, 2.0]
    assert laterality_accuracy(logits, pairs) == 0.5
    assert np.isnan(laterality_accuracy(logits, []))


def test_label_aurocs_use_only_labels_with_both_classes():
    labels = np.full((4, 14), np.nan, np.float32)
    k = CHEXPERT_LABELS.index("Cardiomegaly")
    labels[:, k] = [1, 0, -1, 1]  # uncertain counts as negative
    scores = np.zeros((4, 14), np.float32)
    scores[:, k] = [0.9, 0.1, 0.2, 0.8]
    assert positive_labels(labels)[:, k].tolist() == [1, 0, 0, 1]
    assert label_aurocs(scores, labels) == {"Cardiomegaly": 1.0}
    scores[:, k] = [0.1, 0.9, 0.2, 0.8]
    assert label_aurocs(scores, labels)["Cardiomegaly"] == 0.25


def test_torchxrayvision_densenet_loads_a_local_state_dict_only(tmp_path, monkeypatch):
    import torchxrayvision as xrv

    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None).eval()
    path = tmp_path / "densenet.pt"
    torch.save(net.state_dict(), path)
    feats = XrvDenseNetFeatures(path)
    assert "torchxrayvision-densenet121" in feats.name
    x = torch.randn(2, 1, 64, 64) * 500
    with torch.no_grad():
        expected = net.features2(torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear"))
    torch.testing.assert_close(feats.features(x), expected)
    # a pickled whole model (torchxrayvision's own cache format) is refused, not unpickled
    torch.save(net, tmp_path / "pickled.pt")
    with pytest.raises(RunError, match="state dict"):
        XrvDenseNetFeatures(tmp_path / "pickled.pt")
    with pytest.raises(RunError, match="do not exist"):
        XrvDenseNetFeatures(tmp_path / "missing.pt")
    # the FID extractor takes it from the environment, else falls back to the classifier
    clf = XrayClassifier(ClassifierConfig(image_size=32, channels=[8]))
    monkeypatch.delenv("MEDVL_XRV_DENSENET_WEIGHTS", raising=False)
    assert fid_extractor(clf) is clf
    monkeypatch.setenv("MEDVL_XRV_DENSENET_WEIGHTS", str(path))
    assert isinstance(fid_extractor(clf), XrvDenseNetFeatures)

"""The evaluation classifier: its side head, targets and metrics, how an evaluation receives it (a saved
directory or a loaded model); the torchxrayvision DenseNet feature extractor loads local state dicts only.
Its training and cache: tests/train/test_classifier.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from medvl.errors import RunError
from medvl.eval.classifier import (
    ClassifierConfig,
    ClassifierReport,
    XrayClassifier,
    XrvDenseNetFeatures,
    fid_extractor,
    is_trained_classifier,
    label_aurocs,
    laterality_accuracy,
    laterality_pairs,
    one_sided_findings,
    positive_labels,
    resolve_classifier,
    side_targets,
)
from medvl.text.chexpert import CHEXPERT_LABELS


def test_an_evaluation_takes_a_saved_directory_or_a_loaded_classifier(tmp_path):
    torch.manual_seed(0)
    model = XrayClassifier(ClassifierConfig(image_size=32, channels=[8]), ["effusion"]).eval()
    report = ClassifierReport(
        val_macro_auroc=0.75,
        val_per_label_auroc={"Cardiomegaly": 0.75},
        val_laterality_accuracy=1.0,
        best_step=3,
        side_findings=["effusion"],
        train_images=9,
        side_convention_agreement=1.0,
    )
    assert not is_trained_classifier(tmp_path / "clf")
    model.save_pretrained(tmp_path / "clf", meta={"report": dataclasses.asdict(report)})
    assert is_trained_classifier(tmp_path / "clf")
    for given in (tmp_path / "clf", str(tmp_path / "clf")):
        loaded, loaded_report = resolve_classifier(given, device="cpu")
        assert loaded_report == report and not loaded.training and loaded.side_findings == ("effusion",)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert resolve_classifier((model, report)) == (model, report)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no trained classifier"):
        resolve_classifier(tmp_path / "empty")


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
    regions = pd.DataFrame(
        [
            {
                "dicom_id": "a",
                "finding": "effusion",
                "side": "left",
                "x0": 0.6,
                "x1": 0.9,
                "y0": 0.6,
                "y1": 0.9,
            },
            {
                "dicom_id": "b",
                "finding": "effusion",
                "side": "right",
                "x0": 0.1,
                "x1": 0.4,
                "y0": 0.6,
                "y1": 0.9,
            },
            {
                "dicom_id": "c",
                "finding": "effusion",
                "side": "left",
                "x0": 0.6,
                "x1": 0.9,
                "y0": 0.6,
                "y1": 0.9,
            },
            {
                "dicom_id": "c",
                "finding": "effusion",
                "side": "right",
                "x0": 0.1,
                "x1": 0.4,
                "y0": 0.6,
                "y1": 0.9,
            },
            {
                "dicom_id": "d",
                "finding": "cardiomegaly",
                "side": "",
                "x0": 0.3,
                "x1": 0.7,
                "y0": 0.4,
                "y1": 0.8,
            },
        ]
    )
    ids = ["a", "b", "c", "d"]
    assert one_sided_findings(regions, 2) == ["effusion"]
    t = side_targets(regions, ids, ["effusion"])
    assert t[:, 0].tolist() == [[0, 1], [1, 0], [1, 1], [0, 0]]  # patient left is drawn on the image right
    pairs = laterality_pairs(regions, ids, ["effusion"])
    assert pairs == [(0, 0, 1), (1, 0, 0)]  # c has both sides: no stated side
    small = pd.concat(
        [
            regions,
            pd.DataFrame(
                [
                    {
                        "dicom_id": "d",
                        "finding": "effusion",
                        "side": "right",
                        "x0": 0.1,
                        "x1": 0.15,
                        "y0": 0.6,
                        "y1": 0.9,
                    }
                ]
            ),
        ]
    )
    assert laterality_pairs(small, ids, ["effusion"]) == [(0, 0, 1), (1, 0, 0), (3, 0, 0)]
    assert laterality_pairs(small, ids, ["effusion"], min_side=0.1) == [(0, 0, 1), (1, 0, 0)]  # 0.05 wide
    # only the sides the reports state: b's report gave no side (the phantom chose one), c's says left but c has
    # both sides drawn, d's states the right side
    stated = [{("effusion", "left")}, set(), {("effusion", "left")}, {("effusion", "right")}]
    assert laterality_pairs(small, ids, ["effusion"], stated=stated) == [(0, 0, 1), (3, 0, 0)]
    assert laterality_pairs(small, ids, ["effusion"], stated=[{("effusion", "right")}] * 4) == [
        (1, 0, 0),
        (3, 0, 0),
    ]
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

"""torchxrayvision DenseNet metrics from a local weights file (randomly initialised, written by the test)."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest
import torch

from medvl.errors import ConfigError, RunError
from medvl.eval.xrv import frechet_distance, load_xrv_densenet, parse_features, xrv_block
from medvl.text.chexpert import CHEXPERT_LABELS

xrv = pytest.importorskip("torchxrayvision")

RELEASE_NAME = "mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


class NotAModel:
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was tried")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(xrv.utils, "download", refuse)


@pytest.fixture(scope="module")
def random_densenet():
    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None, num_classes=18).eval()
    with torch.no_grad():  # BatchNorm statistics away from the defaults, so a wrong load shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def _scans(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.uniform(-1024, 1024, (n, 1, size, size)).astype(np.float32)


def _reference(net, images: np.ndarray) -> torch.Tensor:
    x = torch.nn.functional.interpolate(torch.from_numpy(images), size=(224, 224), mode="bilinear")
    with torch.no_grad():
        return net.features2(x)


def test_release_format_file_loads_without_network(tmp_path, random_densenet):
    path = tmp_path / RELEASE_NAME
    torch.save(random_densenet, path)  # the releases' format: a pickled whole DenseNet
    model = load_xrv_densenet(path)
    # names from torchxrayvision's table for these weights: untrained outputs ('') are not scored
    assert model.pathologies == xrv.models.model_urls["densenet121-res224-mimic_nb"]["labels"]
    assert model.chexpert_outputs["Pleural Effusion"] == 7  # xrv's 'Effusion'
    assert "Infiltration" not in model.chexpert_outputs and len(model.chexpert_outputs) == 11
    images = _scans(2)
    feats, probs = model.run(images)
    assert feats.shape == (2, 1024) and probs.shape == (2, 18)
    np.testing.assert_allclose(feats, _reference(random_densenet, images).numpy(), rtol=1e-4, atol=1e-5)
    assert "mimic_nb" in model.name


def test_legacy_serialization_release_file(tmp_path, random_densenet):
    path = tmp_path / RELEASE_NAME  # releases saved before torch's zip format: the legacy pickle stream
    torch.save(random_densenet, path, _use_new_zipfile_serialization=False)
    images = _scans(1, seed=4)
    model = load_xrv_densenet(path)
    np.testing.assert_allclose(
        model.run(images)[0], _reference(random_densenet, images).numpy(), rtol=1e-4, atol=1e-5
    )


def test_state_dict_and_safetensors_files(tmp_path, random_densenet):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in random_densenet.state_dict().items() if k != "op_threshs"}
    torch.save(state, tmp_path / "densenet.pt")
    save_file(state, str(tmp_path / "densenet.safetensors"))
    images = _scans(1, seed=1)
    expected = _reference(random_densenet, images).numpy()
    for name in ("densenet.pt", "densenet.safetensors"):
        model = load_xrv_densenet(tmp_path / name)
        assert model.pathologies == list(xrv.datasets.default_pathologies)  # 18 outputs, no known file name
        np.testing.assert_allclose(model.run(images)[0], expected, rtol=1e-4, atol=1e-5)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(RunError, match="missing.pt does not exist"):
        load_xrv_densenet(tmp_path / "missing.pt")
    torch.save({"obj": NotAModel()}, tmp_path / "foreign.pt")
    with pytest.raises(RunError, match="NotAModel"):
        load_xrv_densenet(tmp_path / "foreign.pt")
    torch.save({"obj": NotAModel()}, tmp_path / "foreign_legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(RunError, match="NotAModel"):
        load_xrv_densenet(tmp_path / "foreign_legacy.pt")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(RunError, match="does not hold a torchxrayvision DenseNet"):
        load_xrv_densenet(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="xrv:PATH"):
        parse_features("inception:/x.pt")
    assert str(parse_features("xrv:/w/d.pt")) == "/w/d.pt"


def test_metrics_block(tmp_path, random_densenet):
    path = tmp_path / RELEASE_NAME
    torch.save(random_densenet, path)
    real, fake = _scans(8, seed=2), _scans(8, seed=3) * 0.1 - 500  # darker, flatter "synthesized" scans
    labels = np.full((8, len(CHEXPERT_LABELS)), np.nan)
    labels[:4, CHEXPERT_LABELS.index("Pleural Effusion")] = 1
    labels[4:, CHEXPERT_LABELS.index("Cardiomegaly")] = 1
    metrics, conventions = xrv_block(f"xrv:{path}", real, fake, labels)
    assert np.isfinite(metrics["image.xrv.fid"]) and metrics["image.xrv.fid"] >= 0
    per = {k for k in metrics if k.startswith("image.xrv.per_label.")}
    assert per == {"image.xrv.per_label.Pleural Effusion.auroc", "image.xrv.per_label.Cardiomegaly.auroc"}
    assert 0 <= metrics["image.xrv.label_auroc"] <= 1
    assert "image.xrv.real_per_label.Cardiomegaly.auroc" in metrics
    assert "Pleural Effusion" in conventions["image.xrv"]
    # a set against itself: 0, though 8 samples in 1024-d make the covariance singular
    same, _ = xrv_block(f"xrv:{path}", real, real, labels)
    assert same["image.xrv.fid"] == pytest.approx(0.0, abs=1e-6 * metrics["image.xrv.fid"])


def test_frechet_distance_matches_monai_where_both_are_defined():
    from monai.metrics import FIDMetric

    g = np.random.default_rng(0)
    a = g.normal(size=(400, 6))
    b = g.normal(0.5, 1.5, size=(300, 6)) @ g.normal(size=(6, 6))
    expected = float(FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.usefixtures("single_thread")
def test_evaluate_diffusion_reports_xrv_beside_the_classifier(tiny_prepared, tmp_path, random_densenet):
    from medvl.eval.classifier import ClassifierConfig
    from medvl.eval.image import evaluate_diffusion
    from medvl.train.classifier import evaluation_classifier
    from tests.models.diffusion_fixtures import build_tiny_runs

    weights = tmp_path / RELEASE_NAME
    torch.save(random_densenet, weights)
    run = build_tiny_runs(tmp_path / "runs", tiny_prepared)["diff"]
    cfg = ClassifierConfig(image_size=32, channels=[8, 16, 32], steps=4, eval_every=2, batch_size=16)
    classifier = evaluation_classifier(tiny_prepared, cfg, device="cpu")
    options = dict(run=run, data=tiny_prepared, classifier=classifier, steps=2, diversity_reports=0)
    with pytest.raises(RunError, match="gone.pt does not exist"):
        evaluate_diffusion(**options, unconditional_baseline=False, features=f"xrv:{tmp_path / 'gone.pt'}")
    record = evaluate_diffusion(**options, unconditional_baseline=False, features=f"xrv:{weights}")
    assert record["image.fid_features"].startswith("medvl-classifier") and record["image.fid"] >= 0
    assert record["image.xrv.fid"] >= 0 and "mimic_nb" in record["image.xrv.features"]
    assert 0 <= record["image.xrv.label_auroc"] <= 1
    assert any(k.startswith("image.xrv.per_label.") for k in record)
    assert "image.xrv" in record["meta"]["conventions"]

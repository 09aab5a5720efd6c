from __future__ import annotations

import math

import pytest
import torch

from medvl.errors import ConfigError
from medvl.models.adamatch.encoders import BackboneConfig, BackboneKind, build_backbone
from medvl.models.adamatch.patches import (
    AdaPatchConfig,
    AdaptivePatchLayer,
    PatchMode,
    grid_centres,
    patch_stats,
)


def _layer(
    mode: PatchMode, grid: int = 4, points: int = 3, c: int = 8, d: int = 16, **kw
) -> AdaptivePatchLayer:
    torch.manual_seed(0)
    return AdaptivePatchLayer(c, d, AdaPatchConfig(mode=mode, grid=grid, points=points, **kw))


def _randomise_predictor(layer: AdaptivePatchLayer, scale: float = 3.0) -> None:
    with torch.no_grad():
        for p in layer.predictor.parameters():
            p.normal_(0, scale)


@pytest.mark.parametrize("mode", list(PatchMode))
def test_shapes(mode):
    layer = _layer(mode, grid=4, points=3)
    out = layer(torch.randn(2, 8, 6, 6))
    assert out.features.shape == (2, 16, 16)
    assert out.boxes.shape == (2, 16, 4)
    assert out.centres.shape == (2, 16, 2)
    assert out.points.shape == (2, 16, 9, 2)
    assert out.shift.shape == out.size.shape == (2, 16, 2)


@pytest.mark.parametrize("mode", [PatchMode.ADAPTIVE, PatchMode.FREEFORM])
def test_boxes_and_points_stay_inside_the_image(mode):
    layer = _layer(mode, grid=5, max_scale=4.0, max_offset=3.0)
    _randomise_predictor(layer)
    with torch.no_grad():
        out = layer(torch.randn(3, 8, 7, 7) * 5)
    b = out.boxes
    assert (b >= 0).all() and (b <= 1).all()
    assert (b[..., 2] >= b[..., 0]).all() and (b[..., 3] >= b[..., 1]).all()
    assert (out.points >= 0).all() and (out.points <= 1).all()
    # points lie in their patch's box
    lo, hi = b[..., None, :2] - 1e-6, b[..., None, 2:] + 1e-6
    assert ((out.points >= lo) & (out.points <= hi)).all()
    # the predictor really moved things
    assert float(out.shift.abs().max()) > 0.1


def test_shift_and_scale_are_bounded():
    layer = _layer(PatchMode.ADAPTIVE, grid=6, max_shift=1.0, max_scale=2.0)
    _randomise_predictor(layer, 10.0)
    with torch.no_grad():
        out = layer(torch.randn(2, 8, 6, 6) * 10)
    assert float(out.shift.abs().max()) <= 1.0 + 1e-6  # cells
    # sides are within [1/2, 2] cells, except where the image border clips them
    assert float(out.size.max()) <= 2.0 + 1e-5
    cell = 1 / 6
    interior = ((out.boxes[..., :2] > 1e-6) & (out.boxes[..., 2:] < 1 - 1e-6)).all(-1)
    assert float(out.size[interior].min()) >= 0.5 - 1e-5
    assert torch.allclose(out.size[..., 0] * cell, out.boxes[..., 2] - out.boxes[..., 0])


@pytest.mark.parametrize(
    "mode, box_embedding",
    [(PatchMode.ADAPTIVE, False), (PatchMode.FREEFORM, False), (PatchMode.ADAPTIVE, True)],
)
def test_zero_initialised_predictor_equals_the_fixed_grid(mode, box_embedding):
    fmap = torch.randn(2, 8, 5, 5)
    grid = _layer(PatchMode.GRID, grid=4, points=3, box_embedding=box_embedding)
    adaptive = _layer(mode, grid=4, points=3, box_embedding=box_embedding)
    missing, unexpected = adaptive.load_state_dict(grid.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("predictor") for k in missing)
    a, g = adaptive(fmap), grid(fmap)
    assert torch.allclose(a.boxes, g.boxes, atol=1e-6)
    assert torch.allclose(a.points, g.points, atol=1e-6)
    assert torch.allclose(a.features, g.features, atol=1e-5)
    # the grid's boxes are the cells
    c = grid_centres(4)
    assert torch.allclose(g.boxes[0, :, :2], c - 1 / 8) and torch.allclose(g.boxes[0, :, 2:], c + 1 / 8)
    stats = patch_stats(a)
    assert stats["mean_shift"] == 0.0 and math.isclose(stats["box_size"], 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("mode", [PatchMode.ADAPTIVE, PatchMode.FREEFORM])
def test_gradients_reach_the_offset_predictor(mode):
    layer = _layer(mode, grid=4, points=2, size_weight=0.1)
    fmap = torch.randn(2, 8, 6, 6)
    out = layer(fmap)
    (out.features.pow(2).sum() + out.penalty).backward()
    last = layer.predictor if isinstance(layer.predictor, torch.nn.Linear) else layer.predictor[-1]
    assert last.weight.grad is not None and float(last.weight.grad.abs().sum()) > 0
    assert float(last.bias.grad.abs().sum()) > 0


def test_grid_mode_has_no_predictor_and_config_is_checked():
    assert _layer(PatchMode.GRID).predictor is None
    with pytest.raises(ConfigError):
        AdaPatchConfig(max_scale=0.5).validate()


def test_small_cnn_and_resnet_from_a_local_state_dict(tmp_path):
    import torchvision

    cnn = build_backbone(BackboneConfig(kind=BackboneKind.SMALL_CNN, channels=[8, 16], extra_convs=1))
    assert cnn(torch.zeros(2, 1, 32, 32)).shape == (2, 16, 8, 8)

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(ref.state_dict(), path)
    net = build_backbone(BackboneConfig(kind=BackboneKind.RESNET18, resnet_layer=3, weights=str(path)))
    assert torch.allclose(net.body[0].weight, ref.conv1.weight.sum(1, keepdim=True))  # RGB stem summed
    assert torch.equal(net.body[6][0].conv1.weight, ref.layer3[0].conv1.weight)
    assert net(torch.zeros(1, 1, 64, 64)).shape == (1, net.out_channels, 4, 4)

    wrong = {**ref.state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}  # not a resnet18
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="does not match"):
        build_backbone(BackboneConfig(kind=BackboneKind.RESNET18, weights=str(tmp_path / "wrong.pt")))
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone(BackboneConfig(kind=BackboneKind.RESNET18, weights=str(tmp_path / "missing.pt")))


def test_xrv_densenet_from_local_weights_only(tmp_path):
    import torchxrayvision as xrv

    ref = xrv.models.DenseNet(weights=None)
    with torch.no_grad():
        ref.features.norm5.weight.fill_(0.5)
    path = tmp_path / "xrv.pt"
    torch.save({k: v for k, v in ref.state_dict().items() if k.startswith("features.")}, path)
    net = build_backbone(BackboneConfig(kind=BackboneKind.XRV_DENSENET, weights=str(path)))
    assert torch.equal(net.features.norm5.weight, ref.features.norm5.weight)
    assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 1024, 2, 2)
    # torchxrayvision's own .pt files are pickled modules: refused with the one-line conversion
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="convert once"):
        build_backbone(BackboneConfig(kind=BackboneKind.XRV_DENSENET, weights=str(tmp_path / "pickled.pt")))

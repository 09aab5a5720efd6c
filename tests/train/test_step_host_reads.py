"""A training step of each image stage leaves its logs on the device: medvl's own code makes the host wait for a
tensor's value at most where a shape depends on one (AdaMatch's W, the longest report's content words), once.

On a GPU each such read stalls the step until the device has caught up, and under ``torch.compile`` a value read
into Python is a guard that recompiles the step whenever it changes.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from medvl.config import CONFIG_ROOT
from tests.models.host_reads import HostReads

MEDVL = str(Path(__file__).resolve().parents[2] / "medvl")


class ReadsFromMedvl(HostReads):
    """:class:`HostReads` keeping, for each read, the medvl function that issued it (None when the innermost
    Python frame is another package's, e.g. transformers' attention-mask check)."""

    SKIP = (__file__, HostReads.__module__.replace(".", "/") + ".py")  # this mode's own frames

    def __init__(self):
        super().__init__()
        self.where: list[str | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.seen) > before:
            frames = [
                f
                for f in traceback.extract_stack()
                if "torch/" not in f.filename and not f.filename.endswith(self.SKIP)
            ]
            inner = frames[-1] if frames else None
            self.where.append(inner.name if inner and MEDVL in inner.filename else None)
        return out


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    from tests.models.diffusion_fixtures import build_tiny_runs

    return build_tiny_runs(tmp_path_factory.mktemp("host_reads_runs"), tiny_prepared, diffusion_steps=1)


def _stage(name: str, data: Path, runs: dict[str, Path], overrides: list[str]):
    if name == "adamatch":
        from medvl.train.stages.adamatch import build_stage

        return build_stage(config_path=CONFIG_ROOT / "adamatch" / "tiny.yaml", overrides=overrides, data=data)
    if name == "autoencoder":
        from medvl.train.stages.autoencoder import build_autoencoder_stage

        return build_autoencoder_stage(config_path="tiny", overrides=overrides, data=data)
    if name == "diffusion":
        from medvl.train.stages.diffusion import build_diffusion_stage

        sources = [runs["ada"], runs["rep"], runs["ae"]]
        return build_diffusion_stage(config_path="tiny", overrides=overrides, data=data, from_runs=sources)
    from medvl.train.stages.distill import build_distill_stage

    return build_distill_stage(config_path="tiny", overrides=overrides, data=data, from_runs=[runs["diff"]])


@pytest.mark.parametrize(
    ("name", "overrides", "reads"),
    [
        ("adamatch", [], ["word_order"]),
        ("adamatch", ["model.word_loss_weight=0.5", "model.global_weight=0.1"], ["word_order"]),
        ("autoencoder", [], []),
        ("diffusion", [], []),
        ("diffusion", ["data.cache_text=false"], []),
        ("distill", [], []),
    ],
)
def test_a_training_step_reads_the_device_only_for_a_shape(name, overrides, reads, tiny_prepared, runs):
    torch.manual_seed(0)
    stage = _stage(name, tiny_prepared, runs, overrides)
    model = stage.build_model().train()
    ds = stage.train_dataset()
    batch = stage.collate([ds[i] for i in range(4)])
    with ReadsFromMedvl() as seen:
        loss, logs = stage.training_step(model, batch)
        loss.backward()
    ours = [w for w in seen.where if w is not None]
    assert ours == reads, seen.seen
    assert logs and all(
        isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in logs.values()
    )


def test_a_diffusion_step_encoding_its_reports_copies_nothing_to_the_host(tiny_prepared, runs, monkeypatch):
    """``data.cache_text: false`` (the ``base`` presets: MIMIC-CXR's word features do not fit in memory) encodes
    each batch's reports in the step. The features stay on the device, rounded as the cache would round them: no
    ``.cpu()`` (a copy the host waits for on a GPU), no list of values read back."""
    from medvl.train.stages.diffusion import DiffusionStage

    torch.manual_seed(0)
    stage = _stage("diffusion", tiny_prepared, runs, ["data.cache_text=false"])
    model = stage.build_model().train()
    ds = stage.train_dataset()
    batch = stage.collate([ds[i] for i in range(4)])
    assert "report" in batch
    cached = stage.encode_reports(list(batch["report"]))  # the CPU copy a cache holds
    expected = cached.to("cpu", torch.float32).as_kwargs()

    def refuse(self, *args, **kwargs):
        raise AssertionError("the step copied a tensor to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    given = DiffusionStage._features_kwargs(stage, batch, stage.device)
    loss, _ = stage.training_step(model, batch)
    loss.backward()
    monkeypatch.undo()
    assert given.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(given[key], value), key

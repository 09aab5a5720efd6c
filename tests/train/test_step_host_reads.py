"""A training step of each stage leaves its logs on the device: medvl's own code makes the host wait for a
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

    # Tensor methods that hand values to the host without an operator this mode sees (on a GPU each copies to
    # the host and waits for the device); a CPU tensor's .cpu() is itself, so those are counted by name too.
    METHODS = ("tolist", "cpu", "numpy")

    def __init__(self):
        super().__init__()
        self.where: list[str | None] = []
        self._saved: dict[str, object] = {}

    def _where(self) -> str | None:
        frames = [
            f
            for f in traceback.extract_stack()
            if "torch/" not in f.filename and not f.filename.endswith(self.SKIP)
        ]
        inner = frames[-1] if frames else None
        return inner.name if inner and MEDVL in inner.filename else None

    def __enter__(self):
        for name in self.METHODS:
            real = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _real=real, **kwargs):
                self.seen.append(_name)
                self.where.append(self._where())
                return _real(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.seen) > before:
            self.where.append(self._where())
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
    if name == "report":
        from medvl.config import resolve_config_path
        from medvl.train.stages.report import build_stage as build_report_stage

        path = resolve_config_path("report", "tiny")
        return build_report_stage(config_path=path, overrides=overrides, data=data, from_runs=[runs["ada"]])
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
        ("report", ["data.precompute_features=false"], []),  # the base presets: AdaMatch runs in the step
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


def test_a_diffusion_step_encoding_its_reports_gives_the_cached_features(tiny_prepared, runs):
    """``data.cache_text: false`` (the ``base`` presets: MIMIC-CXR's word features do not fit in memory) encodes
    each batch's reports in the step, on the device (no value read back: the parametrised test above); the
    model gets the features the cache would hold, rounded the same way."""
    from medvl.train.stages.diffusion import DiffusionStage

    stage = _stage("diffusion", tiny_prepared, runs, ["data.cache_text=false"])
    ds = stage.train_dataset()
    batch = stage.collate([ds[i] for i in range(4)])
    assert "report" in batch
    expected = stage.encode_reports(list(batch["report"])).to("cpu", torch.float32).as_kwargs()
    given = DiffusionStage._features_kwargs(stage, batch, stage.device)
    assert given.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(given[key], value), key

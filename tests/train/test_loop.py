"""The shared training loop on a toy stage: learning, exact resume, model selection, refusals,
bf16, gradient accumulation, the stage registry."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medvl import registry
from medvl.config import ConfigError, load_config
from medvl.errors import DataError, RunError
from medvl.runs import find_from_run, read_stage_info
from medvl.train import stages as stages_mod
from medvl.train.checkpoint import CHECKPOINT_DIR, LOOP_STATE_FILE, latest_checkpoint
from medvl.train.loop import TrainConfig, default_param_groups, fit, lr_factor
from medvl.train.state_files import load_state
from tests.train.toy_stage import Interrupt, ToyConfig, ToyModelConfig, ToyNet, ToyStage


def make_config(**train) -> ToyConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=3, eval_every=2, log_every=1)
    base.update(train)
    model = {k: base.pop(k) for k in ("dropout", "augment", "samples") if k in base}
    return ToyConfig(model=ToyModelConfig(**model), train=TrainConfig(**base))


def checkpoint_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / CHECKPOINT_DIR / f"step_{step}" / "model.safetensors"))


def optimizer_state(run: Path, step: int) -> dict:
    return load_state(run / CHECKPOINT_DIR / f"step_{step}" / "optimizer.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_decreases(tmp_path):
    stage = ToyStage(make_config(steps=40, eval_every=10, checkpoint_every=0, dropout=0.0))
    result = fit(stage, tmp_path / "run")
    first, last = stage.validations[0][1]["val_loss"], stage.validations[-1][1]["val_loss"]
    assert last < 0.5 * first
    info = json.loads((tmp_path / "run" / "stage.json").read_text())
    assert info["stage"] == "toy" and info["steps"] == 40 and result.steps == 40
    assert (
        info["best_step"] == result.best_step and info["images_per_second"] > 0 and info["peak_memory_mb"] > 0
    )
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"] == 40
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "best").exists()
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
    # the first and last 20 step losses of the launch: the run learned, no NaN
    curve = info["loss_curve"]
    assert len(curve["first"]) == len(curve["last"]) == 20 and info["stopped_by_time"] is False
    assert all(math.isfinite(v) for v in curve["first"] + curve["last"])
    assert sum(curve["last"]) < sum(curve["first"])


def test_time_budget_stops_the_run_and_saves_it(tmp_path, monkeypatch):
    import medvl.train.loop as loop

    clock = iter(range(0, 10_000, 10))  # every reading of the loop's clock is 10 s after the one before
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    stage = ToyStage(make_config(steps=1000, eval_every=0, checkpoint_every=0, log_every=5, max_seconds=300))
    result = fit(stage, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "stage.json").read_text())
    assert info["stopped_by_time"] is True and 0 < result.steps < 1000 and result.steps % 5 == 0
    assert (tmp_path / "run" / "model.safetensors").is_file() and stage.validations  # validated and saved
    assert len(info["loss_curve"]["first"]) == min(20, result.steps)
    with pytest.raises(ConfigError, match="max_seconds"):
        make_config(max_seconds=-1).train.validate()


@pytest.mark.parametrize(
    "variant",
    [dict(num_workers=0), dict(num_workers=1, grad_accum=2, augment=0.3)],
    ids=["main-process", "worker-augment-accum"],
)
def test_resume_is_exact(tmp_path, variant):
    # 40 samples, batch 8: an epoch is 5 micro-batches, so the runs cross epoch boundaries; dropout on.
    cfg = make_config(samples=40, dropout=0.3, **variant)
    straight = ToyStage(cfg)
    fit(straight, tmp_path / "straight")

    crashed = ToyStage(cfg, interrupt_at=5)  # checkpoint at 3, crash during step 5
    with pytest.raises(Interrupt):
        fit(crashed, tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed").name == "step_3"
    pos = json.loads((tmp_path / "resumed" / CHECKPOINT_DIR / "step_3" / LOOP_STATE_FILE).read_text())
    consumed = 3 * cfg.train.grad_accum
    assert pos["micro_batches"] == consumed and (pos["epoch"], pos["batch_in_epoch"]) == divmod(consumed, 5)

    resumed = ToyStage(cfg)
    fit(resumed, tmp_path / "resumed", resume=True)
    assert resumed.steps_seen == [4, 5, 6]  # continued, not restarted
    assert_same(checkpoint_tensors(tmp_path / "straight", 6), checkpoint_tensors(tmp_path / "resumed", 6))
    opt_a, opt_b = optimizer_state(tmp_path / "straight", 6), optimizer_state(tmp_path / "resumed", 6)
    for k, s in opt_a["state"].items():
        for name, t in s.items():
            assert torch.equal(t, opt_b["state"][k][name]), (k, name)
    assert_same(straight.saved, resumed.saved)
    a = json.loads((tmp_path / "straight" / "stage.json").read_text())
    b = json.loads((tmp_path / "resumed" / "stage.json").read_text())
    assert (a["best_step"], a["best_metrics"]) == (b["best_step"], b["best_metrics"])


def test_validation_does_not_change_training(tmp_path):
    """Validation draws from isolated random streams: eval_every changes selection, not training."""
    a, b = ToyStage(make_config(eval_every=1)), ToyStage(make_config(eval_every=0))
    fit(a, tmp_path / "a")
    fit(b, tmp_path / "b")
    assert_same(checkpoint_tensors(tmp_path / "a", 6), checkpoint_tensors(tmp_path / "b", 6))
    assert len(a.validations) == 6 and len(b.validations) == 1


def test_best_by_validation_is_saved(tmp_path):
    cfg = make_config(
        select_metric="scripted", select_mode="max", eval_every=2, checkpoint_every=2, keep_checkpoints=3
    )
    stage = ToyStage(cfg, validate_metrics=[0.1, 0.9, 0.3])  # at steps 2, 4, 6
    result = fit(stage, tmp_path / "run")
    assert result.best_step == 4 and result.best_metrics["scripted"] == pytest.approx(0.9)
    assert_same(stage.saved, checkpoint_tensors(tmp_path / "run", 4))
    assert not torch.equal(
        stage.saved["net.0.weight"], checkpoint_tensors(tmp_path / "run", 6)["net.0.weight"]
    )
    info = json.loads((tmp_path / "run" / "stage.json").read_text())
    assert info["best_step"] == 4


def test_missing_select_metric_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="select_metric 'auroc'.*val_loss"):
        fit(ToyStage(make_config(select_metric="auroc")), tmp_path / "run")


def test_refuses_to_overwrite(tmp_path):
    run = tmp_path / "run"
    fit(ToyStage(make_config()), run)
    with pytest.raises(RunError, match="already holds a finished 'toy' run"):
        fit(ToyStage(make_config()), run)
    with pytest.raises(RunError, match="nothing to resume"):
        fit(ToyStage(make_config()), run, resume=True)

    partial = tmp_path / "partial"
    with pytest.raises(Interrupt):
        fit(ToyStage(make_config(), interrupt_at=4), partial)
    with pytest.raises(RunError, match="unfinished run .*step 3.*--resume"):
        fit(ToyStage(make_config()), partial)
    with pytest.raises(RunError, match="differs .* train.lr"):
        fit(ToyStage(make_config(lr=0.5)), partial, resume=True)
    fit(ToyStage(make_config(eval_every=1, num_workers=0)), partial, resume=True)  # harmless changes are fine

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a medvl run"):
        fit(ToyStage(make_config()), foreign)


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    stage = ToyStage(make_config(checkpoint_every=0))
    fit(stage, tmp_path / "run", resume=True)
    assert stage.steps_seen == list(range(1, 7))


def test_bf16_runs_on_cpu(tmp_path):
    stage = ToyStage(make_config(precision="bf16", steps=20, eval_every=10, dropout=0.0))
    fit(stage, tmp_path / "run")
    assert stage.validations[-1][1]["val_loss"] < stage.validations[0][1]["val_loss"]
    assert all(torch.isfinite(t).all() for t in stage.saved.values())
    assert json.loads((tmp_path / "run" / "stage.json").read_text())["precision"] == "bf16"


def test_bf16_autocast_reaches_the_model(tmp_path):
    seen = []

    class Probe(ToyStage):
        def training_step(self, model, batch):
            out = super().training_step(model, batch)
            seen.append(model.autocast_seen)
            return out

    fit(Probe(make_config(precision="bf16", steps=2, checkpoint_every=0)), tmp_path / "bf16")
    fit(Probe(make_config(precision="fp32", steps=2, checkpoint_every=0)), tmp_path / "fp32")
    assert seen == [True, True, False, False]


def test_grad_accum_equals_bigger_batch(tmp_path):
    small = make_config(batch_size=4, grad_accum=2, dropout=0.0, steps=4, max_grad_norm=0.0)
    big = dataclasses.replace(small, train=dataclasses.replace(small.train, batch_size=8, grad_accum=1))
    a, b = ToyStage(small), ToyStage(big)
    fit(a, tmp_path / "a")
    fit(b, tmp_path / "b")
    for k in a.saved:
        torch.testing.assert_close(a.saved[k], b.saved[k], rtol=1e-5, atol=1e-6)


def test_divergence_is_reported(tmp_path):
    class Diverging(ToyStage):
        def training_step(self, model, batch):
            loss, logs = super().training_step(model, batch)
            return loss * float("nan"), logs

    with pytest.raises(RunError, match="diverged: loss is nan at step 1"):
        fit(Diverging(make_config()), tmp_path / "run")


def test_dataset_smaller_than_a_batch(tmp_path):
    with pytest.raises(DataError, match="fewer than one global batch"):
        fit(ToyStage(make_config(samples=4)), tmp_path / "run")


def test_lr_schedule():
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(x >= y for x, y in zip(f[4:], f[5:], strict=False))
    assert math.isclose(f[20], 0.1) and math.isclose(f[12], 0.55)


def test_default_param_groups_skip_decay_on_biases_norms_and_scalars():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    net.temperature = torch.nn.Parameter(torch.tensor(0.07))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    net.frozen = frozen
    groups = default_param_groups(net, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and decay == {id(net[0].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4
    assert not any(id(p) in decay for p in frozen.parameters())


def test_train_config_is_validated():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(ToyConfig, None, ["train.lr=0"])
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config(ToyConfig, None, ["train.grad_accum=0"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(ToyConfig, None, ["train.precision=fp16"])


def test_run_stage_through_the_registry(tmp_path, monkeypatch):
    toy = dataclasses.replace(registry.STAGES["adamatch"], builder="tests.train.toy_stage:build_stage")
    monkeypatch.setitem(registry.STAGES, "adamatch", toy)
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "model": {"dropout": 0.0},
                "train": {"steps": 3, "batch_size": 8, "eval_every": 0, "log_every": 1},
            }
        )
    )
    data = tmp_path / "data"
    data.mkdir()
    result = stages_mod.run_stage(
        "adamatch",
        config=cfg_file,
        data=data,
        out=tmp_path / "run",
        from_runs=[],
        overrides=["train.lr=0.005"],
        resume=False,
    )
    assert result.steps == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.005 and saved["model"]["dropout"] == 0.0
    assert read_stage_info(tmp_path / "run")["stage"] == "toy"
    assert find_from_run([tmp_path / "run"], "toy") == tmp_path / "run"
    with pytest.raises(RunError, match="needs a finished 'adamatch' run"):
        find_from_run([tmp_path / "run"], "adamatch")
    with pytest.raises(RunError, match="not a finished medvl run"):
        stages_mod.run_stage("adamatch", config=cfg_file, data=data, out=tmp_path / "run2", from_runs=[data])


def test_missing_stage_module_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from medvl.cli import main

    missing = dataclasses.replace(registry.STAGES["report"], builder="medvl.train.no_such_stage:build_stage")
    monkeypatch.setitem(registry.STAGES, "report", missing)
    with pytest.raises(RunError, match="stage 'report' is not available in this version"):
        registry.builder("report")
    with pytest.raises(ConfigError, match="unknown stage 'foo'"):
        registry.builder("foo")
    code = main(
        ["train", "report", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    assert code == 2 and "not available in this version" in capsys.readouterr().err


class EmaStage(ToyStage):
    """Keeps an exponential moving average of the weights outside the model (like a diffusion EMA)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema: dict[str, torch.Tensor] = {}

    def on_step_end(self, model, step):
        for k, v in model.state_dict().items():
            self.ema[k] = v.detach().clone() if k not in self.ema else 0.5 * self.ema[k] + 0.5 * v.detach()
        super().on_step_end(model, step)

    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state):
        self.ema = state["ema"]

    def log_images(self, model, step):
        return {"ramp": torch.linspace(0, 1, 16).reshape(1, 4, 4), "pair": torch.rand(2, 1, 4, 4)}


def test_stage_state_travels_in_checkpoints(tmp_path):
    cfg = make_config()
    straight = EmaStage(cfg)
    fit(straight, tmp_path / "straight")
    with pytest.raises(Interrupt):
        fit(EmaStage(cfg, interrupt_at=5), tmp_path / "resumed")
    resumed = EmaStage(cfg)
    fit(resumed, tmp_path / "resumed", resume=True)
    assert resumed.steps_seen == [4, 5, 6]
    assert_same(straight.ema, resumed.ema)


def test_tensorboard_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(EmaStage(make_config(eval_every=3)), tmp_path / "plain")
    events = EventAccumulator(str(tmp_path / "plain" / "logs"))
    events.Reload()
    assert events.Tags()["images"] == []  # pictures of validation scans only when asked for

    fit(EmaStage(make_config(eval_every=3, log_images=True)), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "logs"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/pred_std", "val/val_loss"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/val_loss")] == [3, 6]
    assert {"images/ramp", "images/pair"} <= set(events.Tags()["images"])


def test_tensor_logs_are_logged_as_floats_are(tmp_path):
    """A stage may return its logs as 0-d tensors, which the loop sums on the device over micro-batches and
    reads at the log line: the logged values equal those of the same logs returned as floats."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class TensorLogs(ToyStage):
        def training_step(self, model, batch):
            out = model(x=batch["x"], y=batch["y"])
            return out["loss"], {"pred_std": out["pred"].detach().float().std()}

    cfg = make_config(batch_size=4, grad_accum=2, steps=4, log_every=2, eval_every=0, checkpoint_every=0)
    values = {}
    for name, stage in (("floats", ToyStage(cfg)), ("tensors", TensorLogs(cfg))):
        fit(stage, tmp_path / name)
        events = EventAccumulator(str(tmp_path / name / "logs"))
        events.Reload()
        values[name] = [(e.step, e.value) for e in events.Scalars("train/pred_std")]
    assert [step for step, _ in values["tensors"]] == [2, 4]
    for (_, a), (_, b) in zip(values["floats"], values["tensors"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-6), (a, b)


def test_training_time_includes_the_wait_at_a_log_line(tmp_path, monkeypatch):
    """On a GPU the steps between log lines only queue work, and the log line waits for it: that wait is
    training time (images_per_second in stage.json), validation and checkpoints are not."""
    import time

    from medvl.train import loop

    real = loop._Training.log_train

    def slow_log(self, *args, **kwargs):  # the device catching up with the queued steps
        time.sleep(0.25)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop._Training, "log_train", slow_log)
    cfg = make_config(batch_size=4, steps=4, log_every=2, eval_every=0, checkpoint_every=0)
    fit(ToyStage(cfg), tmp_path / "run")
    info = read_stage_info(tmp_path / "run")
    assert info["images_per_second"] <= 4 * 4 / (2 * 0.25)  # two log lines of 0.25 s inside the timed steps


def test_unfinished_checkpoint_writes_are_ignored(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        fit(ToyStage(make_config(), interrupt_at=5), run)
    (run / CHECKPOINT_DIR / ".tmp_step_6").mkdir()  # killed while writing
    (run / CHECKPOINT_DIR / "step_9").mkdir()  # no loop_state.json: not a complete checkpoint
    assert latest_checkpoint(run).name == "step_3"
    stage = ToyStage(make_config())
    fit(stage, run, resume=True)
    assert stage.steps_seen == [4, 5, 6]
    assert not (run / CHECKPOINT_DIR / ".tmp_step_6").exists()


class TiedNet(ToyNet):
    """Two layers sharing one weight matrix, as GPT-2's tied input and output embeddings."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__(hidden, dropout)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x, y=None):
        out = super().forward(x, y)
        if y is not None:
            out["loss"] = out["loss"] + 1e-2 * self.b(self.a(x)).pow(2).mean()
        return out


class TiedStage(ToyStage):
    def build_model(self):
        return TiedNet(self.config.model.hidden, self.config.model.dropout)


def test_tied_weights_survive_checkpoints(tmp_path):
    cfg = make_config()
    straight = TiedStage(cfg)
    fit(straight, tmp_path / "straight")
    with pytest.raises(Interrupt):
        fit(TiedStage(cfg, interrupt_at=5), tmp_path / "resumed")
    resumed = TiedStage(cfg)
    fit(resumed, tmp_path / "resumed", resume=True)
    assert resumed.steps_seen == [4, 5, 6]
    assert_same(straight.saved, resumed.saved)

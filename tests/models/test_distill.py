"""Few-step students (``medvl train distill``): the consistency sampler's arithmetic, the distillation losses'
known answers, what trains and what stays frozen, and a student run that ``medvl synthesize`` draws from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medvl.config import CONFIG_ROOT, load_config
from medvl.errors import ConfigError, RunError
from medvl.inference.synthesize import Synthesizer, synthesize_command
from medvl.models.diffusion import (
    ConsistencyScheduler,
    NoiseScheduleConfig,
    SamplerName,
    build_sampler,
    consistency_boundary,
    consistency_grid,
)
from medvl.train.stages.distill import DistillStageConfig, build_distill_stage
from tests.models.diffusion_fixtures import build_tiny_runs, finish_run, train_plain

pytestmark = pytest.mark.usefixtures("single_thread")

REPORTS = ["Small left pleural effusion. No pneumothorax.", "Normal chest. No acute disease."]


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    return build_tiny_runs(tmp_path_factory.mktemp("distill_runs"), tiny_prepared)


def _stage(runs, data, *overrides):
    return build_distill_stage(
        config_path="tiny", overrides=list(overrides), data=data, from_runs=[runs["diff"]]
    )


@pytest.fixture(scope="module")
def student(runs, tiny_prepared, tmp_path_factory):
    stage = _stage(runs, tiny_prepared)
    model, losses = train_plain(stage, 4, lr=1e-4)
    assert all(math.isfinite(v) for v in losses)
    return finish_run(stage, model, tmp_path_factory.mktemp("student") / "run")


# --------------------------------------------------------------------------------------- the sampler


def test_consistency_grid_and_lcm_timesteps():
    grid = consistency_grid(1000, 20)
    assert len(grid) == 50 and int(grid[0]) == 19 and int(grid[-1]) == 999
    sched = ConsistencyScheduler(1000, "scaled_linear_beta", beta_start=0.0015, beta_end=0.0205, skip=20)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 519, 279]  # LCM's 4-step schedule
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]
    with pytest.raises(ValueError, match="1..50"):
        sched.set_timesteps(51)


def test_boundary_condition_is_the_identity_at_zero():
    c_skip, c_out = consistency_boundary(torch.tensor([0, 19, 999]))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    assert float(c_skip[2]) < 1e-8 and abs(float(c_out[2]) - 1.0) < 1e-8


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampling_recovers_a_point_mass(steps):
    # data = one point x0: the exact velocity at (x, t) is a_t eps - s_t x0 with eps = (x - a_t x0) / s_t, and
    # any number of consistency steps must land on x0 (fresh noise or not)
    noise_cfg = NoiseScheduleConfig()
    sched = build_sampler(noise_cfg, SamplerName.CONSISTENCY)
    sched.set_timesteps(steps)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in sched.timesteps:
        acp = float(sched.alphas_cumprod[int(t)])
        a, s = math.sqrt(acp), math.sqrt(1 - acp)
        v = a * (x - a * x0) / s - s * x0
        x, _ = sched.step(v, int(t), x, noise=torch.randn_like(x))
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)


def test_consistency_step_needs_fresh_noise_between_steps():
    sched = build_sampler(NoiseScheduleConfig(), SamplerName.CONSISTENCY)
    sched.set_timesteps(2)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        sched.step(torch.zeros_like(x), int(sched.timesteps[0]), x)


# --------------------------------------------------------------------------------------- config


def test_presets_load_and_bad_combinations_are_refused():
    for name in ("tiny", "demo", "base"):
        cfg = load_config(DistillStageConfig, CONFIG_ROOT / "distill" / f"{name}.yaml")
        assert cfg.sampler.name is SamplerName.CONSISTENCY and cfg.sampler.guidance == 1.0
    with pytest.raises(ConfigError, match="ordinary sampler"):
        load_config(DistillStageConfig, CONFIG_ROOT / "distill" / "tiny.yaml", ["method=guidance"]).validate()
    with pytest.raises(ConfigError, match="guidance of a student must be 1"):
        load_config(
            DistillStageConfig, CONFIG_ROOT / "distill" / "tiny.yaml", ["sampler.guidance=3"]
        ).validate()
    with pytest.raises(ConfigError):
        load_config(DistillStageConfig, CONFIG_ROOT / "distill" / "tiny.yaml", ["consistency.skipp=3"])


def test_distill_needs_a_diffusion_run_and_not_a_student(runs, tiny_prepared, student):
    with pytest.raises(RunError, match="'diffusion' run"):
        build_distill_stage(config_path="tiny", overrides=[], data=tiny_prepared, from_runs=[runs["ae"]])
    (student / "stage.json").write_text(
        json.dumps({"stage": "diffusion"})
    )  # a student passed off as a teacher
    try:
        with pytest.raises(RunError, match="already a distilled student"):
            build_distill_stage(config_path="tiny", overrides=[], data=tiny_prepared, from_runs=[student])
    finally:
        (student / "stage.json").write_text(json.dumps({"stage": "distill"}))


# --------------------------------------------------------------------------------------- training


def test_guidance_distillation_at_scale_one_starts_at_zero_loss(runs, tiny_prepared):
    # the student starts as the teacher; at guidance 1 the teacher's target is its own conditional velocity
    stage = _stage(
        runs,
        tiny_prepared,
        "method=guidance",
        "sampler.name=dpm_solver_2m",
        "guidance=1.0",
        "condition_dropout=0",
    )
    model = stage.build_model().train()
    batch = stage.collate([stage.train_dataset()[i] for i in range(4)])
    loss, _ = stage.training_step(model, batch)
    assert float(loss.detach()) < 1e-10
    # at the teacher's scale (2) the target differs from the student's conditional output
    stage2 = _stage(
        runs, tiny_prepared, "method=guidance", "sampler.name=dpm_solver_2m", "condition_dropout=0"
    )
    assert stage2.guidance == 2.0
    loss2, _ = stage2.training_step(stage2.build_model().train(), batch)
    assert float(loss2.detach()) > 1e-6


def test_only_the_student_trains(runs, tiny_prepared):
    stage = _stage(runs, tiny_prepared)
    torch.manual_seed(0)
    model = stage.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, _ = train_plain(stage, 3, lr=1e-3)
    after = trained.state_dict()
    # a fresh model from the same stage: compare by name across the two (build_model copies the teacher)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(k.startswith("denoiser.unet.") for k in changed)
    assert any(k.startswith("ema.unet.") for k in changed)  # the target follows the student
    assert not any(k.startswith("teacher.") for k in changed)
    assert not any(".conditioner.memory." in k for k in changed)  # the shared memory stays frozen
    groups = stage.param_groups(trained)
    ids = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in ids for p in trained.teacher.parameters())
    assert all(id(p) not in ids for p in trained.ema.parameters())


def test_validation_reports_the_distance_to_the_teacher(runs, tiny_prepared):
    stage = _stage(runs, tiny_prepared)
    model = stage.build_model().eval()
    metrics = stage.validate(model)
    assert set(metrics) == {"val_ode_mse", "val_loss"}
    assert all(math.isfinite(v) and v >= 0 for v in metrics.values())
    # the reference is the teacher's own sample, computed once
    ref = stage.teacher_reference(torch.device("cpu"))
    assert ref is stage.teacher_reference(torch.device("cpu"))


# --------------------------------------------------------------------------------------- the student run


def test_student_run_records_its_teacher_and_samples_fast(student, runs, tmp_path):
    sched = json.loads((student / "diffusion" / "scheduler_config.json").read_text())
    assert sched["sampler"]["name"] == "consistency" and sched["sampler"]["guidance"] == 1.0
    assert sched["distilled"]["method"] == "consistency"
    assert sched["distilled"]["guidance"] == 2.0  # the tiny teacher's
    assert sched["distilled"]["teacher"].endswith("diff")
    synth = Synthesizer.load(student)
    a = synth.synthesize(REPORTS, seed=7, sampler="fast")
    b = synth.synthesize(REPORTS, seed=7)
    c = synth.synthesize(REPORTS, seed=8)
    assert a.shape == (2, 1, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # fresh noise per step comes from each sample's own seed: a report alone draws the same scan as in a batch
    torch.testing.assert_close(synth.synthesize(REPORTS[1:], seed=9), c[1:], atol=8.0, rtol=0)
    assert synthesize_command(REPORTS[0], run=student, out=tmp_path / "s.png", sampler="fast") == 0
    assert synth.unconditional(2, seed=1).shape == (2, 1, 32, 32)


def test_student_is_a_registered_stage_with_a_loader(student):
    import medvl.registry as registry

    spec = registry.stage("distill")
    assert spec.needs == ("diffusion",)
    synth = registry.loader("distill")(student)
    assert isinstance(synth, Synthesizer) and synth.distilled is not None

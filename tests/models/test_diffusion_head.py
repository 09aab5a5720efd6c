"""The diffusion head: tiny autoencoder and UNet train and sample; guidance 0 is the unconditional model;
the scheduler config round-trips; samplers integrate exactly for an oracle model; runs are self-contained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medvl.config import CONFIG_ROOT, load_config
from medvl.errors import ConfigError, RunError
from medvl.models.diffusion import (
    AutoencoderBundle,
    NoiseScheduleConfig,
    SamplerConfig,
    SamplerName,
    build_sampler,
    build_train_scheduler,
    guided_velocity,
    initial_noise,
    load_scheduler_config,
    save_scheduler_config,
)
from medvl.train.stages.autoencoder import AutoencoderStageConfig, build_autoencoder_stage
from medvl.train.stages.diffusion import DiffusionStageConfig, build_diffusion_stage, resolve_source_runs
from tests.models.diffusion_fixtures import build_tiny_runs, finish_run, train_plain

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory) -> dict[str, Path]:
    return build_tiny_runs(tmp_path_factory.mktemp("diffusion_runs"), tiny_prepared)


@pytest.fixture(scope="module")
def synth(runs):
    from medvl.inference.synthesize import Synthesizer

    return Synthesizer.load(runs["diff"], device="cpu")


REPORTS = ["Small left pleural effusion. Heart size is normal.", "Cardiomegaly. No focal consolidation."]


def test_tiny_autoencoder_trains_and_saves_its_latent_scale(tiny_prepared, tmp_path):
    stage = build_autoencoder_stage(config_path="tiny", overrides=["train.steps=8"], data=tiny_prepared)
    model, losses = train_plain(stage, 8, lr=3e-3)
    assert losses[-1] < losses[0]
    val = stage.validate(model)
    assert 0 < val["val_l1"] < 1 and val["val_psnr"] > 0
    stage.save_run(model, tmp_path)
    bundle = AutoencoderBundle.from_pretrained(tmp_path / "autoencoder")
    assert bundle.latent.latent_shape == [3, 16, 16]
    assert bundle.latent.scale_factor > 0 and bundle.latent.num_images == 16
    x = torch.stack([stage.train_dataset()[i] for i in range(2)])
    with torch.no_grad():
        expected = model.autoencoder.reconstruct(x)
        got = bundle.model.reconstruct(x)
    torch.testing.assert_close(got, expected)


def test_adversarial_terms_give_each_network_only_its_own_gradient(tiny_prepared):
    stage = build_autoencoder_stage(
        config_path="tiny",
        data=tiny_prepared,
        overrides=[
            "loss.adversarial_weight=1.0",
            "loss.discriminator_channels=8",
            "loss.discriminator_layers=2",
            "loss.kl_weight=0.0",
        ],
    )
    torch.manual_seed(0)
    model = stage.build_model().train()
    x = torch.stack([stage.train_dataset()[i] for i in range(4)])
    torch.manual_seed(1)
    out = model(x)
    out["loss"].backward()
    d_grads = {n: p.grad.clone() for n, p in model.discriminator.named_parameters()}
    assert all(torch.isfinite(g).all() for g in d_grads.values())
    assert model.autoencoder.encoder.blocks[0].conv.weight.grad.abs().sum() > 0
    # The discriminator's gradient is that of its own loss only (same noise, fresh graph).
    model.zero_grad()
    model.step.zero_()
    torch.manual_seed(1)
    recon, _, _ = model.autoencoder(x)
    d_loss = 0.5 * (
        model.adversarial(model.discriminator(recon.detach())[-1], False, True)
        + model.adversarial(model.discriminator(x)[-1], True, True)
    )
    d_loss.backward()
    for n, p in model.discriminator.named_parameters():
        torch.testing.assert_close(d_grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_perceptual_loss_needs_local_weights(tiny_prepared):
    with pytest.raises(ConfigError, match="perceptual_weights"):
        build_autoencoder_stage(
            config_path="tiny", data=tiny_prepared, overrides=["loss.perceptual_weight=0.1"]
        )
    with pytest.raises(ConfigError, match="does not exist"):
        build_autoencoder_stage(
            config_path="tiny",
            data=tiny_prepared,
            overrides=["loss.perceptual_weight=0.1", "loss.perceptual_weights=/nope.pt"],
        )


def test_tiny_unet_trains_with_frozen_memory_and_ema(runs, tiny_prepared):
    stage = build_diffusion_stage(
        config_path="tiny", overrides=[], data=tiny_prepared, from_runs=[runs["ada"], runs["rep"], runs["ae"]]
    )
    torch.manual_seed(0)
    fresh = stage.build_model()
    model, losses = train_plain(stage, 6)
    assert all(torch.isfinite(torch.tensor(losses)))
    memory_before = fresh.denoiser.conditioner.memory.memory
    torch.testing.assert_close(model.denoiser.conditioner.memory.memory, memory_before)  # frozen
    assert not model.denoiser.conditioner.memory.memory.requires_grad
    w, e = model.denoiser.unet.out[2].conv.weight, model.ema.unet.out[2].conv.weight
    assert not torch.equal(w, e) and not torch.equal(e, fresh.ema.unet.out[2].conv.weight)  # EMA moved, lags
    val = stage.validate(model)
    assert {"val_loss", "val_loss_uncond", "val_condition_gain"} <= set(val)
    assert stage.validate(model) == val  # fixed noise and timesteps


def test_training_latents_are_encoded_once(runs, tiny_prepared, monkeypatch):
    stage = build_diffusion_stage(
        config_path="tiny", overrides=[], data=tiny_prepared, from_runs=[runs["ada"], runs["rep"], runs["ae"]]
    )
    calls = []
    encode = stage.autoencoder.encode
    monkeypatch.setattr(stage.autoencoder, "encode", lambda x: calls.append(len(x)) or encode(x))
    first = stage.train_dataset()
    n = len(calls)
    assert n > 0 and sum(calls) == len(first)
    train_plain(stage, 2)
    assert stage.train_dataset() is first and len(calls) == n


def test_diffusion_run_is_self_contained(runs):
    from medvl.version import __version__

    diff = runs["diff"]
    formats = {
        "diffusion": "medvl.diffusion",
        "autoencoder": "medvl.autoencoder",
        "adamatch": "medvl.adamatch",
        "memory": "medvl.memory",
    }
    for folder, fmt in formats.items():
        assert (diff / folder / "model.safetensors").is_file(), folder
        config = json.loads((diff / folder / "config.json").read_text())
        assert config["format"] == fmt and config["layout"] == 2 and config["medvl_version"] == __version__
    assert json.loads((diff / "autoencoder" / "config.json").read_text())["latent"]["scale_factor"] > 0
    assert (diff / "adamatch" / "tokenizer" / "tokenizer.json").is_file()
    assert not list(diff.glob("**/*.pt")) and not list(diff.glob("**/*.bin"))  # safetensors only
    sched = json.loads((diff / "diffusion" / "scheduler_config.json").read_text())
    assert sched["train"]["prediction_type"] == "v_prediction" and sched["train"]["clip_sample"] is False


def test_sampling_is_deterministic_and_in_range(synth):
    a = synth.synthesize(REPORTS, seed=7)
    b = synth.synthesize(REPORTS, seed=7)
    c = synth.synthesize(REPORTS, seed=8)
    assert a.shape == (2, 1, 32, 32) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1024 and a.max() <= 1024
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # report i uses seed + i, so one report alone gives (to float rounding) the same scan as in a batch
    torch.testing.assert_close(synth.synthesize(REPORTS[1:], seed=8), a[1:], atol=8.0, rtol=0)  # of 2048


@pytest.mark.parametrize("sampler", [s for s in SamplerName if s is not SamplerName.CONSISTENCY])
def test_every_sampler_runs(synth, sampler):
    out = synth.synthesize(REPORTS[:1], steps=3, guidance=2.0, seed=0, sampler=sampler)
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["consistency", "fast"])
def test_a_teacher_refuses_the_students_samplers(synth, sampler):
    # the consistency sampler means nothing for a model not distilled for it; "fast" names a student's sampler
    with pytest.raises(RunError, match="medvl train distill"):
        synth.synthesize(REPORTS[:1], steps=2, seed=0, sampler=sampler)


def test_guidance_zero_equals_unconditional(synth):
    guided = synth.synthesize(REPORTS, guidance=0.0, seed=3, steps=4)
    uncond = synth.unconditional(len(REPORTS), seed=3, steps=4)
    assert torch.equal(guided, uncond)
    # and the batched [cond; uncond] combination agrees with the separate passes
    den = synth.denoiser
    feats = synth.encoder.encode(REPORTS)
    ctx = den.conditioner(**feats.as_kwargs())
    null = den.conditioner.null_context(2)
    x = initial_noise((3, 16, 16), [0, 1], torch.device("cpu"))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        v_u, v_c = den(x, t, null), den(x, t, ctx)
        for g in (0.0, 1.0, 3.0):
            batched = guided_velocity(den, x, t, ctx, null, g, batched=True)
            torch.testing.assert_close(batched, v_u + g * (v_c - v_u), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(v_u, v_c)  # the report changes the prediction


def test_scheduler_config_round_trips(tmp_path):
    noise = NoiseScheduleConfig(
        num_train_timesteps=500, schedule="scaled_linear_beta", beta_start=0.001, beta_end=0.02
    )
    sampler = SamplerConfig(name=SamplerName.DDIM, steps=33, guidance=4.5)
    save_scheduler_config(tmp_path, noise, sampler)
    assert (tmp_path / "scheduler_config.json").is_file()
    noise2, sampler2 = load_scheduler_config(tmp_path)
    assert noise2 == noise and sampler2 == sampler
    train = build_train_scheduler(noise2)
    for name in SamplerName:
        s = build_sampler(noise2, name)
        torch.testing.assert_close(s.alphas_cumprod, train.alphas_cumprod)
        assert s.prediction_type == "v_prediction"
        assert not getattr(s, "clip_sample", False)
    with pytest.raises(RunError):
        load_scheduler_config(tmp_path / "missing")


@pytest.mark.parametrize(
    "name,steps,tol",
    [("ddim", 10, 1e-3), ("dpm_solver_2m", 10, 1e-3), ("dpm_solver_2m", 1, 1e-3), ("plms", 10, 0.1)],
)
def test_samplers_recover_the_data_point_with_an_oracle_model(name, steps, tol):
    """For data concentrated on one point x0 the exact v-prediction is known in closed form; every ODE
    sampler must land on x0 (PLMS stops at t=0, not at the clean sample, hence the looser tolerance)."""
    noise_cfg = NoiseScheduleConfig()
    sched = build_sampler(noise_cfg, name)
    acp = build_train_scheduler(noise_cfg).alphas_cumprod.double()
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).view(1, 3, 2, 2)
    x = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        a, s = acp[int(t)].sqrt(), (1 - acp[int(t)]).sqrt()
        eps = (x - a * x0) / s
        v = a * eps - s * x0
        x, _ = sched.step(v, int(t), x)
    assert (x - x0).abs().max() < tol


def test_empty_report_is_refused(synth):
    from medvl.errors import InvalidReportError

    with pytest.raises(InvalidReportError, match="empty"):
        synth.synthesize(["  \n\t "])


def test_from_runs_are_checked(runs):
    with pytest.raises(RunError, match="autoencoder"):
        resolve_source_runs([runs["ada"], runs["rep"]], need_memory=True)
    with pytest.raises(RunError, match="AdaMatch"):
        resolve_source_runs([runs["ae"]], need_memory=False)
    with pytest.raises(RunError, match="report run"):
        resolve_source_runs([runs["ae"], runs["ada"]], need_memory=True)
    src = resolve_source_runs([runs["ae"], runs["ada"]], need_memory=False)
    assert src.memory is None and src.adamatch == runs["ada"]
    # a report run's copy of AdaMatch is enough
    from medvl.models.pretrained import copy_component

    rep = runs["rep"]
    copy_component(runs["ada"], rep / "adamatch")
    src = resolve_source_runs([runs["ae"], rep], need_memory=True)
    assert src.adamatch == rep and src.memory == rep / "memory"


@pytest.mark.parametrize("preset", ["tiny", "demo", "base"])
def test_presets_validate(preset):
    ae = load_config(AutoencoderStageConfig, CONFIG_ROOT / "autoencoder" / f"{preset}.yaml")
    diff = load_config(DiffusionStageConfig, CONFIG_ROOT / "diffusion" / f"{preset}.yaml")
    ae.model.validate()
    diff.unet.validate()
    assert diff.noise.prediction_type == "v_prediction"
    assert 0.05 <= diff.condition.dropout <= 0.2
    if preset == "base":
        assert ae.model.image_size == 512 and ae.model.latent_shape == (3, 64, 64)


def test_abnormal_reports_can_be_repeated(runs, tiny_prepared):
    stage = build_diffusion_stage(
        config_path="tiny",
        overrides=["data.abnormal_repeat=2"],
        data=tiny_prepared,
        from_runs=[runs["ada"], runs["rep"], runs["ae"]],
    )
    ds = stage.train_dataset()
    assert len(ds) == 6 + 2 * 27  # 33 training scans, 6 of them normal
    normal = [t for t in ds.texts if t.startswith("The lungs are clear")]
    assert len(normal) == 6
    effusion = [i for i, t in enumerate(ds.texts) if t.startswith("Small left pleural effusion")]
    assert len(effusion) % 2 == 0
    i, j = effusion[:2]
    torch.testing.assert_close(ds[i]["latent_mu"], ds[j]["latent_mu"])


def test_negated_words_are_marked_and_left_out_of_the_summary(synth):
    feats = synth.encoder.encode(
        ["No pleural effusion.", "Small left pleural effusion.", "No effusion. Cardiomegaly."]
    )
    kinds = [
        [int(k) for k, m in zip(row, mask, strict=True) if m]
        for row, mask in zip(feats.word_kind, feats.word_mask, strict=True)
    ]
    # [CLS], no (stop word), pleural, effusion (negated), ".", [SEP]
    assert kinds[0] == [0, 0, 1, 1, 0, 0]
    assert kinds[1] == [0, 2, 2, 2, 2, 0, 0]
    assert kinds[2] == [0, 0, 1, 0, 2, 0, 0]
    cond = synth.denoiser.conditioner
    with torch.no_grad():
        ctx = cond(**feats.as_kwargs())
        nothing = cond.out_norm(cond.nothing_affirmed + cond.kind[3])
    torch.testing.assert_close(ctx[0, 0], nothing)  # a fully negated report affirms nothing
    assert not torch.allclose(ctx[1, 0], nothing) and not torch.allclose(ctx[2, 0], nothing)


def test_coordinate_channels_tell_left_from_right(synth):
    """The UNet sees two extra input channels: x growing toward the image's right, y toward the feet."""
    den = synth.denoiser
    assert den.unet.conv_in.conv.in_channels == 3 + 2 + 2  # latents, coordinates, side maps
    seen = []
    hook = den.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            den(torch.zeros(2, 3, 16, 16), torch.tensor([400, 400]), den.conditioner.null_context(2))
    finally:
        hook.remove()
    xs, ys = seen[0][:, 3], seen[0][:, 4]
    assert torch.equal(xs[:, :, 0], torch.full((2, 16), -1.0)) and torch.equal(
        xs[:, :, -1], torch.ones(2, 16)
    )
    assert (xs.diff(dim=-1) > 0).all() and (ys.diff(dim=-2) > 0).all()


def test_side_maps_follow_the_positive_findings_of_the_report(synth):
    from medvl.models.diffusion import report_sides

    sides = report_sides(
        [
            "Small left pleural effusion.",
            "No right effusion. Right lower lobe opacity.",
            "No left effusion.",
            "Bilateral effusions.",
            "Cardiomegaly.",
        ]
    )
    assert sides.tolist() == [[0, 1], [1, 0], [0, 0], [1, 1], [0, 0]]  # [patient right, patient left]
    den = synth.denoiser
    seen = []
    hook = den.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    feats = synth.encoder.encode(["Small left pleural effusion."])
    ctx = den.conditioner(**feats.as_kwargs())
    try:
        with torch.no_grad():
            guided_velocity(
                den,
                torch.zeros(1, 3, 16, 16),
                torch.tensor([300]),
                ctx,
                den.conditioner.null_context(1),
                2.0,
                sides=feats.sides,
            )
    finally:
        hook.remove()
    maps = seen[0][:, 5:]  # (2, 2, 16, 16): conditional half, then unconditional half
    assert maps[1].abs().sum() == 0  # the null condition carries no hint
    assert maps[0, 0].sum() == 0  # nothing on the patient's right (image left)
    assert maps[0, 1, :, 8:].min() == 1 and maps[0, 1, :, :8].max() == 0  # patient's left = image right


def test_layout_maps_draw_stated_findings_where_the_prior_puts_them():
    import pandas as pd

    from medvl.models.diffusion import layout_prior_from_regions, report_layout

    regions = pd.DataFrame(
        [
            {
                "dicom_id": f"a{i}",
                "finding": "effusion",
                "side": "left",
                "zone": "base",
                "x0": 0.6,
                "y0": 0.5 + i / 100,
                "x1": 0.9,
                "y1": 0.7 + i / 100,
            }
            for i in range(5)
        ]
        + [
            {
                "dicom_id": "b",
                "finding": "effusion",
                "side": "right",
                "zone": "base",
                "x0": 0.1,
                "y0": 0.5,
                "x1": 0.4,
                "y1": 0.7,
            },  # one box only: below min_count, left out
            {
                "dicom_id": "c",
                "finding": "cardiomegaly",
                "side": "",
                "zone": "",
                "x0": 0.3,
                "y0": 0.3,
                "x1": 0.7,
                "y1": 0.7,
            },
        ]
    )
    prior = layout_prior_from_regions(regions, [f"a{i}" for i in range(5)] + ["b", "c"])
    assert (
        prior["effusion/left/base"]
        == prior["effusion/left/any"]
        == prior["*/left/any"]
        == [0.75, 0.62, 0.3, 0.2]
    )
    assert not any("right" in k or "cardiomegaly" in k for k in prior)
    assert layout_prior_from_regions(regions, ["c"]) == {}

    maps = report_layout(
        [
            "Small left pleural effusion.",
            "Pleural effusion.",
            "Bilateral effusions.",
            "No left effusion. Right upper lobe opacity.",
            "Cardiomegaly.",
        ],
        prior,
        grid=20,
    )
    assert maps.shape == (5, 2, 20, 20) and 0 <= maps.min() and maps.max() <= 1
    left, centres = maps[0, 1], (torch.arange(20) + 0.5) / 20
    cx, cy = (
        float((left.sum(0) * centres).sum() / left.sum()),
        float((left.sum(1) * centres).sum() / left.sum()),
    )
    assert abs(cx - 0.75) < 0.02 and abs(cy - 0.62) < 0.02 and maps[0, 0].sum() == 0  # the prior's box centre
    assert maps[1].sum() == 0  # no side stated: nothing drawn
    assert maps[2, 0].sum() > 0 and maps[2, 1].sum() > 0
    assert (
        maps[3, 1].sum() == 0 and divmod(int(maps[3, 0].argmax()), 20)[1] < 10
    )  # patient right = image left
    assert divmod(int(maps[3, 0].argmax()), 20)[0] < 10  # upper zone (the built-in prior)
    assert maps[4].sum() == 0


def test_a_zone_layout_run_keeps_its_prior_and_feeds_maps(tiny_prepared, runs, tmp_path):
    from medvl.inference.synthesize import Synthesizer

    stage = build_diffusion_stage(
        config_path="tiny",
        overrides=["condition.layout=zones"],
        data=tiny_prepared,
        from_runs=[runs["ada"], runs["rep"], runs["ae"]],
    )
    assert stage.config.condition.layout_prior  # estimated from the toy data's regions.csv
    model, _ = train_plain(stage, 2)
    synth = Synthesizer.load(finish_run(stage, model, tmp_path / "zones"), device="cpu")
    cond = synth.denoiser.conditioner.cfg
    assert cond.layout == "zones" and cond.layout_prior == stage.config.condition.layout_prior
    den = synth.denoiser
    seen = []
    hook = den.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    feats = synth.encoder.encode(["Small left pleural effusion."])
    assert feats.sides.shape == (1, 2, cond.layout_grid, cond.layout_grid)
    try:
        with torch.no_grad():
            guided_velocity(
                den,
                torch.zeros(1, 3, 16, 16),
                torch.tensor([300]),
                den.conditioner(**feats.as_kwargs()),
                den.conditioner.null_context(1),
                2.0,
                sides=feats.sides,
            )
    finally:
        hook.remove()
    maps = seen[0][:, 5:]
    assert maps[1].abs().sum() == 0 and maps[0, 0].sum() == 0  # null condition: none; patient right: none
    assert maps[0, 1, :, 8:].sum() > 10 * maps[0, 1, :, :8].sum()  # the patient's left is the image's right
    image = synth.synthesize("Small left pleural effusion.", seed=3)
    assert torch.equal(image, synth.synthesize("Small left pleural effusion.", seed=3))


def test_context_layers_bind_words_and_survive_a_save(tiny_prepared, runs, tmp_path):
    from medvl.inference.synthesize import Synthesizer

    stage = build_diffusion_stage(
        config_path="tiny",
        overrides=["unet.side_maps=false", "condition.layout=none", "condition.context_layers=1"],
        data=tiny_prepared,
        from_runs=[runs["ada"], runs["rep"], runs["ae"]],
    )
    model, _ = train_plain(stage, 2)
    synth = Synthesizer.load(finish_run(stage, model, tmp_path / "ctx"), device="cpu")
    cond = synth.denoiser.conditioner
    assert cond.cfg.context_layers == 1 and hasattr(cond, "context_encoder")
    feats = synth.encoder.encode(["Small left pleural effusion.", "Small right pleural effusion."])
    with torch.no_grad():
        ctx = cond(**feats.as_kwargs())
    # a word token's context now depends on the other words: swapping the side changes the "effusion" slot
    words = feats.word_mask[0].nonzero().flatten()
    assert not torch.allclose(ctx[0, 1 + words[-1]], ctx[1, 1 + words[-1]])
    # padded slots keep the learned pad vector (after the output norm), whatever the report says
    pad = (~feats.word_mask[0]).nonzero().flatten()
    if len(pad):
        assert torch.allclose(ctx[0, 1 + pad[0]], ctx[1, 1 + pad[0]])
    image = synth.synthesize("Small left pleural effusion.", seed=1)
    assert torch.equal(image, synth.synthesize("Small left pleural effusion.", seed=1))


def test_context_heads_must_divide_the_width():
    from medvl.models.diffusion.conditioning import ConditionConfig, ReportConditioner

    with pytest.raises(ConfigError, match="context_heads"):
        ReportConditioner(ConditionConfig(context_layers=1, context_heads=3, use_memory=False), 8, 8, 16)
    with pytest.raises(ConfigError, match="context_layers"):
        ConditionConfig(context_layers=-1).validate()


def test_ema_update_is_the_per_tensor_lerp_and_copies_buffers():
    import copy

    from medvl.models.diffusion.denoiser import ema_update

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    ema, reference = (copy.deepcopy(net).requires_grad_(False) for _ in range(2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net(torch.randn(4, 7))  # batch-norm statistics move
    for _ in range(3):
        ema_update(ema, net, 0.97)
        for e, p in zip(reference.parameters(), net.parameters(), strict=True):
            e.lerp_(p.detach(), 0.03)
    for (name, a), b in zip(ema.state_dict().items(), reference.state_dict().values(), strict=True):
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(a, net.state_dict()[name])  # buffers copied
        else:
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="EMA and model differ"):
        ema_update(ema, torch.nn.Linear(7, 5), 0.97)

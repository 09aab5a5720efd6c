"""The report head: tokenizer, conditioning, decoding (EOS, max length, beam 1 = greedy, cache = no cache),
save/load, and the report stage on the tiny dataset with a real (untrained) AdaMatch run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvl.errors import ConfigError, RunError
from medvl.models import report_head as rh
from medvl.models.memory import MemoryConfig, SharedMemory
from medvl.models.report_bundle import ReportHeadBundle
from medvl.models.report_head import (
    GenerationSettings,
    KeywordHints,
    ReportHead,
    ReportHeadConfig,
    build_report_tokenizer,
    decode_sequences,
    detokenize,
    encode_reports,
    f1_thresholds,
    keyword_hints,
)
from tests.models.report_fixtures import tiny_runs

REPORTS = [
    "The lungs are clear. No pleural effusion.",
    "Small left pleural effusion. Heart size is normal.",
    "Cardiomegaly. No focal consolidation.",
    "Right lower lobe opacity, 3.5 cm.",
]
P, D, K = 6, 12, 3
KEYWORDS = ["effusion", "cardiomegaly", "opacity", "clear"]


pytestmark = pytest.mark.usefixtures("single_thread")


def small_cfg(**changes) -> ReportHeadConfig:
    base = dict(
        n_embd=32,
        n_layer=2,
        n_head=4,
        max_length=16,
        dropout=0.0,
        num_keywords=K,
        memory=MemoryConfig(num_slots=16, dim=24, num_heads=4, topk=4, dropout=0.0),
    )
    base.update(changes)
    return ReportHeadConfig(**base)


@pytest.fixture(scope="module")
def tokenizer():
    return build_report_tokenizer(REPORTS * 2, min_freq=1)


def make_head(tokenizer, **changes) -> ReportHead:
    torch.manual_seed(0)
    return ReportHead(
        small_cfg(**changes),
        vocab_size=len(tokenizer),
        visual_dim=D,
        keyword_vocabulary=KEYWORDS,
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        unk_id=tokenizer.unk_token_id,
    ).eval()


def inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, P, D, generator=g)
    boxes = torch.rand(b, P, 4, generator=g)
    ids = torch.randint(1, len(KEYWORDS) + 1, (b, K), generator=g)
    ids[0, 1:] = 0  # an image with a single keyword
    hints = KeywordHints(
        ids,
        torch.randn(b, K, generator=g),
        torch.rand(b, K, 4, generator=g),
        [[KEYWORDS[i - 1] for i in row if i] for row in ids.tolist()],
    )
    return feats, boxes, hints


def teacher_forced(head, enc, feats, boxes, hints, **extra):
    """The head's teacher-forced pass on ``inputs()``-style conditions (``extra``: report_labels and the like)."""
    return head(
        **enc,
        patch_features=feats,
        patch_boxes=boxes,
        keyword_ids=hints.ids,
        keyword_scores=hints.scores,
        keyword_boxes=hints.boxes,
        **extra,
    )


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_and_detokenize(tokenizer):
    enc = encode_reports(tokenizer, REPORTS[:2], max_length=16)
    ids = enc["input_ids"]
    assert ids[:, 0].eq(tokenizer.bos_token_id).all()
    n0 = int(enc["attention_mask"][0].sum())
    assert ids[0, n0 - 1] == tokenizer.eos_token_id
    assert (enc["labels"][0, n0:] == -100).all()
    words = tokenizer.convert_ids_to_tokens(ids[1, 1 : int(enc["attention_mask"][1].sum()) - 1].tolist())
    assert detokenize(words) == "Small left pleural effusion. Heart size is normal."
    assert detokenize(["opacity", ",", "3", ".", "5", "cm", "."]) == "Opacity, 3.5 cm."
    cut = encode_reports(tokenizer, [REPORTS[1]], max_length=5)["input_ids"]
    assert cut.shape[1] == 5 and tokenizer.eos_token_id not in cut[0].tolist()  # truncated: no EOS


def test_keyword_hints_map_words_and_drop_unknown():
    class Kw:
        def __init__(self, word, score, box):
            self.word, self.score, self.box = word, score, box

    hints = keyword_hints(
        [[Kw("opacity", 2.0, (0, 0, 0.5, 0.5)), Kw("zebra", 9.0, (0, 0, 1, 1))], []], KEYWORDS, 3
    )
    assert hints.ids.tolist() == [[3, 0, 0], [0, 0, 0]]
    assert hints.words == [["opacity"], []]
    assert hints.boxes[0, 0].tolist() == [0, 0, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------- model


def test_forward_shapes_loss_and_ablations(tokenizer):
    feats, boxes, hints = inputs()
    enc = encode_reports(tokenizer, REPORTS[:3], 16)
    for changes, n_cond in (
        ({}, 2 * P + K),
        ({"use_memory": False}, P + K),
        ({"use_keywords": False}, 2 * P),
        ({"use_label_hints": True, "label_loss_weight": 1.0}, 2 * P + K + 14),
    ):
        head = make_head(tokenizer, **changes)
        cond, mask = head.encode_conditions(feats, boxes, hints.ids, hints.scores, hints.boxes)
        assert cond.shape == (3, n_cond, 32) and mask.shape == (3, n_cond)
        if head.cfg.use_keywords:
            assert mask[0, -K:].tolist() == [1, 0, 0]  # padding keywords are masked out
        out = teacher_forced(head, enc, feats, boxes, hints)
        assert out["logits"].shape == (3, enc["input_ids"].shape[1], len(tokenizer))
        assert torch.isfinite(out["loss"])
        assert hasattr(head, "memory") == head.cfg.use_memory
    with pytest.raises(ConfigError, match="divisible"):
        small_cfg(n_embd=30).validate()


def test_auxiliary_label_loss(tokenizer):
    head = make_head(tokenizer, label_loss_weight=0.5).train()
    feats, boxes, hints = inputs()
    enc = encode_reports(tokenizer, REPORTS[:3], 16)
    labels = torch.full((3, 14), float("nan"))
    labels[0, 2] = 1.0
    labels[1, 2] = -1.0  # uncertain counts as negative
    out = teacher_forced(head, enc, feats, boxes, hints, report_labels=labels)
    expected = float((out["lm_loss"] + 0.5 * out["label_loss"]).detach())
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert head.label_head.weight.grad.abs().sum() > 0 and head.patch_in.weight.grad.abs().sum() > 0
    probs = head.predict_labels(feats, boxes)
    assert probs.shape == (3, 14) and ((probs > 0) & (probs < 1)).all()
    plain = make_head(tokenizer)
    assert not hasattr(plain, "label_head")


def test_f1_thresholds_pick_the_best_cut_and_never_call_an_absent_label():
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.1], [0.4, 0.3], [0.3, 0.0]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0], [1, 0]])
    t = f1_thresholds(probs, targets)
    # label 0: cutting at 0.8 gives F1 0.8 (2 of 3), at 0.3 F1 6/7: the lower cut wins
    assert t[0] == pytest.approx(0.3) and t[1] > 1.0


def test_pooled_read_out_fitted_on_cached_features_separates_the_labels():
    from medvl.eval.bootstrap import binary_auroc
    from medvl.models.report_labels import PooledLabels, fit_pooled_labels

    torch.manual_seed(0)
    feats = torch.randn(200, 6, 16)
    labels = torch.full((200, 14), float("nan"))
    labels[:, 3] = (feats[:, :, 0].amax(1) > 1.2).float()  # a label carried by one feature's max
    labels[:, 7] = -1.0  # negatives only (uncertain counts as negative)
    read_out = PooledLabels(16)
    with torch.no_grad():
        before = torch.sigmoid(read_out(feats))
    loss = fit_pooled_labels(read_out, feats.half(), labels, steps=200, batch_size=64)
    with torch.no_grad():
        after = torch.sigmoid(read_out(feats))
    y = labels[:, 3].numpy()
    assert binary_auroc(after[:, 3].numpy(), y) > 0.9 > 0.7 > binary_auroc(before[:, 3].numpy(), y)
    assert after[:, 7].max() < 0.2 and loss < 0.2
    with pytest.raises(ValueError, match="steps"):
        fit_pooled_labels(read_out, feats, labels, steps=0)


def test_label_states_follow_the_reference_in_training_and_the_thresholds_after(tokenizer, tmp_path):
    head = make_head(tokenizer, label_loss_weight=1.0, label_states=True, label_pooling="mean_max")
    feats, boxes, hints = inputs()
    enc = encode_reports(tokenizer, REPORTS[:3], 16)
    n = 2 * P + K + 14
    cond, _ = head.encode_conditions(feats, boxes, hints.ids, hints.scores, hints.boxes)
    assert cond.shape == (3, n, 32)
    labels = torch.zeros(3, 14)
    labels[0, 2] = 1.0
    head.train()
    out = teacher_forced(head, enc, feats, boxes, hints, report_labels=labels)
    out["loss"].backward()
    assert head.label_head.out.weight.grad.abs().sum() > 0  # the label loss reaches the pooled read-out
    assert head.state_embed.weight.grad.abs().sum() > 0  # the decoder reads the states
    assert head.state_vector.weight.grad.abs().sum() > 0  # ... also through every word embedding
    assert head._state_bias is None  # cleared after the decoder call
    head.eval()
    with torch.no_grad():
        head.label_thresholds.fill_(1.01)  # nothing called
        none, _ = head.encode_conditions(feats, boxes, hints.ids, hints.scores, hints.boxes)
        head.label_thresholds.fill_(0.0)  # everything called
        every, _ = head.encode_conditions(feats, boxes, hints.ids, hints.scores, hints.boxes)
    # [patches | 14 label states | memory | keywords]: only the label block moves
    assert not torch.allclose(none[:, P : P + 14], every[:, P : P + 14])
    assert torch.allclose(none[:, :P], every[:, :P]) and torch.allclose(none[:, P + 14 :], every[:, P + 14 :])
    head.label_thresholds.copy_(torch.linspace(0.1, 0.9, 14))
    ReportHeadBundle(head, tokenizer, 64).save_pretrained(tmp_path / "report_head")
    head.memory.save_pretrained(tmp_path / "memory")
    loaded = ReportHeadBundle.from_pretrained(
        tmp_path, memory=SharedMemory.from_pretrained(tmp_path / "memory")
    )
    assert torch.equal(loaded.head.label_thresholds, head.label_thresholds)
    for beams in (1, 2):  # the state bias follows the beams
        a = head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=beams)
        b = loaded.head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=beams)
        assert torch.equal(a.sequences, b.sequences)
    with pytest.raises(ConfigError, match="label_loss_weight"):
        small_cfg(label_states=True).validate()


def test_label_states_as_cross_attention_tokens_only(tokenizer, tmp_path):
    kw = dict(label_loss_weight=1.0, label_states=True, label_pooling="mean_max", label_state_vector=False)
    head = make_head(tokenizer, **kw)
    assert not hasattr(head, "state_vector")
    feats, boxes, hints = inputs()
    enc = encode_reports(tokenizer, REPORTS[:3], 16)
    labels = torch.zeros(3, 14)
    labels[1, 5] = 1.0
    head.train()
    out = teacher_forced(head, enc, feats, boxes, hints, report_labels=labels)
    out["loss"].backward()
    assert head.state_embed.weight.grad.abs().sum() > 0  # the states still reach the decoder
    assert head._state_bias is None
    head.eval()
    with_vector = make_head(tokenizer, **{**kw, "label_state_vector": True})
    hooks = len(head.decoder.transformer.wte._forward_hooks)
    assert len(with_vector.decoder.transformer.wte._forward_hooks) == hooks + 1  # no state hook on the words
    ReportHeadBundle(head, tokenizer, 64).save_pretrained(tmp_path / "report_head")
    head.memory.save_pretrained(tmp_path / "memory")
    loaded = ReportHeadBundle.from_pretrained(
        tmp_path, memory=SharedMemory.from_pretrained(tmp_path / "memory")
    )
    a = head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=2)
    b = loaded.head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=2)
    assert torch.equal(a.sequences, b.sequences)
    assert len(loaded.head.decoder.transformer.wte._forward_hooks) == hooks


def test_word_embeddings_query_the_memory(tokenizer):
    """The memory reaches the decoder through the words too, not only through the conditioning tokens."""
    head = make_head(tokenizer)
    feats, boxes, hints = inputs()
    enc = encode_reports(tokenizer, REPORTS[:3], 16)
    cond, mask = head.encode_conditions(feats, boxes, hints.ids, hints.scores, hints.boxes)
    before = head.decoder(
        input_ids=enc["input_ids"], encoder_hidden_states=cond, encoder_attention_mask=mask
    ).logits
    with torch.no_grad():
        head.memory.memory.mul_(-3.0)
    after = head.decoder(
        input_ids=enc["input_ids"], encoder_hidden_states=cond, encoder_attention_mask=mask
    ).logits
    assert not torch.allclose(before, after)  # same conditioning, different memory -> different logits


def test_training_reduces_loss_and_reaches_memory(tokenizer):
    head = make_head(tokenizer).train()
    feats, boxes, hints = inputs(4)
    enc = encode_reports(tokenizer, REPORTS, 16)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = head(
            **enc,
            patch_features=feats,
            patch_boxes=boxes,
            keyword_ids=hints.ids.repeat(2, 1)[:4],
            keyword_scores=hints.scores.repeat(2, 1)[:4],
            keyword_boxes=hints.boxes.repeat(2, 1, 1)[:4],
        )["loss"]
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert head.memory.memory.grad is not None and head.memory.memory.grad.abs().sum() > 0
            assert head.keyword_embed.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def _greedy_reference(head: ReportHead, feats, boxes, hints, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: full forward passes without a cache, argmax each step (no n-gram blocking)."""
    b = feats.shape[0]
    seq = torch.full((b, 1), head.bos_id)
    suppressed = [head.pad_id, head.bos_id, head.unk_id]
    for _ in range(steps):
        logits = head(
            input_ids=seq,
            attention_mask=torch.ones_like(seq),
            patch_features=feats,
            patch_boxes=boxes,
            keyword_ids=hints.ids,
            keyword_scores=hints.scores,
            keyword_boxes=hints.boxes,
        )["logits"][:, -1]
        logits[:, suppressed] = -float("inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    out = seq[:, 1:]
    after = (out == head.eos_id).long().cumsum(1) - (out == head.eos_id).long()
    return out.masked_fill(after > 0, head.pad_id)


def test_beam_one_equals_greedy_and_cache_changes_nothing(tokenizer):
    head = make_head(tokenizer)
    feats, boxes, hints = inputs()
    greedy = head.generate(
        patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=1, no_repeat_ngram_size=0
    )
    reference = _greedy_reference(head, feats, boxes, hints, steps=greedy.sequences.shape[1])
    assert torch.equal(greedy.sequences, reference)
    beam_cached = head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=3)
    beam_plain = head.generate(
        patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=3, use_cache=False
    )
    assert torch.equal(beam_cached.sequences, beam_plain.sequences)
    assert torch.allclose(beam_cached.scores, beam_plain.scores, atol=1e-5)


def test_decoding_stops_at_eos(tokenizer):
    head = make_head(tokenizer)
    feats, boxes, hints = inputs()
    with torch.no_grad():  # make EOS the most likely token everywhere: ln_f outputs the EOS embedding
        ln = head.decoder.transformer.ln_f
        ln.weight.zero_()
        ln.bias.copy_(head.decoder.transformer.wte.weight[head.eos_id] * 10)
    for beams in (1, 3):
        out = head.generate(
            patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=beams, max_new_tokens=10
        )
        assert out.sequences.shape[1] == 1 and out.sequences[:, 0].eq(head.eos_id).all()
        texts, tokens = decode_sequences(tokenizer, out.sequences, head.eos_id)
        assert texts == ["", "", ""] and tokens == [[], [], []]


def test_decoding_respects_max_length(tokenizer):
    head = make_head(tokenizer)
    feats, boxes, hints = inputs()
    with torch.no_grad():  # EOS can never win
        head.decoder.transformer.wte.weight[head.eos_id] = 0.0
        head.decoder.lm_head.weight[head.eos_id] = 0.0  # tied, but be explicit
    for beams in (1, 2):
        out = head.generate(
            patch_features=feats,
            patch_boxes=boxes,
            keywords=hints,
            num_beams=beams,
            max_new_tokens=7,
            no_repeat_ngram_size=0,
        )
        assert out.sequences.shape == (3, 7)
        assert head.eos_id not in out.sequences.tolist()[0] or beams > 1
    # Never beyond the trained positions: max_length 16 includes BOS.
    long = head.generate(
        patch_features=feats,
        patch_boxes=boxes,
        keywords=hints,
        num_beams=1,
        max_new_tokens=500,
        min_new_tokens=500,
        no_repeat_ngram_size=0,
    )
    assert long.sequences.shape[1] == head.cfg.max_length - 1


def test_save_load_roundtrip(tokenizer, tmp_path):
    head = make_head(tokenizer)
    feats, boxes, hints = inputs()
    before = head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=2)
    settings = GenerationSettings(beams=2, length_penalty=0.8)
    ReportHeadBundle(head, tokenizer, 64, settings).save_pretrained(tmp_path / "report_head")
    head.memory.save_pretrained(tmp_path / "memory")  # the report stage saves the memory beside the head
    assert (tmp_path / "report_head" / "decoder" / "model.safetensors").exists()
    with pytest.raises(RunError, match="shared memory"):
        ReportHeadBundle.from_pretrained(tmp_path)
    mem = SharedMemory.from_pretrained(tmp_path / "memory")  # what the diffusion stage reads
    assert torch.equal(mem.memory, head.memory.memory)
    loaded = ReportHeadBundle.from_pretrained(tmp_path, memory=mem)
    assert (
        loaded.image_size == 64
        and loaded.head.keyword_vocabulary == KEYWORDS
        and loaded.generation == settings
    )
    after = loaded.head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=2)
    assert torch.equal(before.sequences, after.sequences)
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------- stage


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("report_runs"), tiny_prepared)


#: --set overrides of a head with finding states
STATES = ("model.label_loss_weight=1.0", "model.label_states=true", "model.label_pooling=mean_max")


def report_stage(runs, *overrides: str):
    """The report stage of the tiny preset on the module's AdaMatch run, with ``--set`` overrides."""
    from medvl.config import resolve_config_path
    from medvl.train.stages.report import build_stage

    return build_stage(
        config_path=resolve_config_path("report", "tiny"),
        overrides=list(overrides),
        data=runs.data,
        from_runs=[runs.adamatch],
    )


def test_stage_overfits_a_batch_and_validates(runs):
    stage = report_stage(runs, "model.dropout=0.0")
    model = stage.build_model().train()
    ds = stage.train_dataset()
    assert "patch_features" in ds[0]  # frozen AdaMatch: features computed once
    batch = stage.collate([ds[i] for i in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, logs = stage.training_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else logs["loss"]
    assert logs["loss"] < 0.25 * first
    model.eval()
    with torch.no_grad():
        metrics = stage.validate(model)
    assert {"val_loss", "val_bleu4", "val_ce_micro_f1", "val_ce_micro5_f1"} <= set(metrics)
    assert all(v == v for v in metrics.values())  # no NaN


def test_stage_oversamples_reports_that_state_a_finding(runs):
    from medvl.errors import ConfigError

    stage = report_stage(runs, "data.oversample_abnormal=3")
    labels = stage.train_base.labels
    abnormal = (labels[:, 0] != 1.0).nonzero().flatten().tolist()
    assert 0 < len(abnormal) < len(labels)
    ds = stage.train_dataset()
    assert len(ds) == len(labels) + 2 * len(abnormal)
    drawn = [ds[j]["index"] for j in range(len(ds))]
    assert all(drawn.count(i) == (3 if i in abnormal else 1) for i in range(len(labels)))
    with pytest.raises(ConfigError, match="oversample_abnormal"):
        report_stage(runs, "data.oversample_abnormal=0")


def test_stage_fits_the_label_read_out_before_training(runs):
    from medvl.errors import ConfigError

    def head(*extra):
        return report_stage(runs, *STATES, *extra).build_model()

    plain, fitted = head(), head("model.label_fit_steps=100")
    assert torch.equal(plain.label_head.norm.weight, fitted.label_head.norm.weight)
    assert not torch.allclose(plain.label_head.out.weight, fitted.label_head.out.weight)
    with pytest.raises(ConfigError, match="label_fit_steps"):
        head("model.label_fit_steps=10", "model.label_pooling=queries")
    with pytest.raises(ConfigError, match="cached features"):
        head("model.label_fit_steps=10", "data.precompute_features=false")


def test_stage_chooses_label_thresholds_on_validation(runs, monkeypatch):
    from medvl.eval.crossfit import FOLDS, crossfit_folds
    from medvl.train.stages import report as report_stage_module

    fitted_on = []
    real_fit = report_stage_module.rh.f1_thresholds

    def spy(probs, targets):
        fitted_on.append(len(probs))
        return real_fit(probs, targets)

    monkeypatch.setattr(report_stage_module.rh, "f1_thresholds", spy)
    stage = report_stage(runs, *STATES)
    model = stage.build_model().train()
    ds = stage.train_dataset()
    batch = stage.collate([ds[i] for i in range(8)])
    assert "report_labels" in batch
    loss, logs = stage.training_step(model, batch)
    assert "label_loss" in logs
    model.eval()
    assert torch.all(model.label_thresholds == 0.5)
    with torch.no_grad():
        stage.validate(model)
    targets = stage.val_base.labels[stage._val_indices] == 1
    absent = ~targets.any(0)
    assert torch.all(
        model.label_thresholds[absent] > 1.0
    )  # a label without a validation positive is never called
    assert torch.all(model.label_thresholds[~absent] <= 1.0)
    # The scored reports: each fold with thresholds fitted on the other folds; the saved ones on the whole split.
    n = len(stage._val_indices)
    folds = np.bincount(crossfit_folds(n), minlength=FOLDS)
    assert sorted(fitted_on) == sorted([*(n - folds), n]) and fitted_on[-1] == n


def test_stage_without_precompute_matches_precomputed_features(runs):
    """On-the-fly AdaMatch encoding (base preset) gives the same loss as the precomputed features."""
    losses = []
    for pre in (True, False):
        stage = report_stage(runs, f"data.precompute_features={str(pre).lower()}", "model.dropout=0.0")
        model = stage.build_model().eval()
        ds = stage.train_dataset()
        batch = stage.collate([ds[i] for i in range(4)])
        assert ("images" in batch) is (not pre)
        with torch.no_grad():
            losses.append(float(stage.training_step(model, batch)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


@pytest.mark.parametrize("autocast", [False, True])
def test_keyword_hints_built_on_the_device_equal_the_host_ones(runs, autocast):
    """The report stage's step builds its keyword hints on the device (nothing read by the host); they are those
    the host builds from ``image_keywords``, bit for bit, also in bf16 and when fewer keywords exist than asked."""
    from medvl.data.prepared import PreparedDataset
    from medvl.models.adamatch import AdaMatchRun

    am = AdaMatchRun.from_pretrained(runs.adamatch)
    ds = PreparedDataset(runs.data, "train")
    images = torch.stack([torch.from_numpy(ds.image(i)) for i in range(6)])[:, None]
    vocabulary = list(am.keywords.words)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        patches = am.encode_images(images)
        for k in (3, len(vocabulary) + 2):
            on_host = rh.keyword_hints(am.image_keywords(None, top_k=k, patches=patches), vocabulary, k)
            on_device = rh.device_keyword_hints(am.top_keywords(patches, k), k)
            assert (on_device.ids > 0).sum() == min(k, len(vocabulary)) * 6
            for name in ("ids", "scores", "boxes"):
                a, b = getattr(on_device, name), getattr(on_host, name)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, k)


def test_report_run_is_self_contained(runs):
    from medvl.models.adamatch import AdaMatchRun

    run = runs.report
    for needed in (
        "stage.json",
        "config.yaml",
        "report_head/config.json",
        "report_head/model.safetensors",
        "report_head/decoder/model.safetensors",
        "report_head/tokenizer/tokenizer.json",
        "memory/config.json",
        "memory/model.safetensors",
        "adamatch/config.json",
    ):
        assert (run / needed).exists(), needed
    AdaMatchRun.from_pretrained(run)  # the copy loads alone
    assert not (run / "ablations" / "no_memory" / "memory").exists()  # the ablation has no memory


def test_near_repeat_ban_blocks_a_word_coming_back_within_the_window(tokenizer):
    from medvl.models.report_head import GenerationSettings, decoding_rules
    from medvl.models.report_tokenizer import NearRepeatBan

    vocab = tokenizer.get_vocab()
    ids = [vocab[w] for w in ("pleural", "effusion", ",", "no")]
    rule = NearRepeatBan(tokenizer, window=3)
    scores = torch.zeros(1, len(tokenizer))
    out = rule(torch.tensor([[tokenizer.bos_token_id, *ids]]), scores.clone())
    # the last three tokens were "effusion , no": "effusion" and "no" are banned, "," (punctuation) and "pleural"
    # (four tokens back) are not
    assert out[0, vocab["effusion"]] == float("-inf") and out[0, vocab["no"]] == float("-inf")
    assert out[0, vocab[","]] == 0 and out[0, vocab["pleural"]] == 0
    assert torch.isfinite(out).sum() == len(tokenizer) - 2
    assert decoding_rules(tokenizer, GenerationSettings()) == []
    assert isinstance(
        decoding_rules(tokenizer, GenerationSettings(no_repeat_word_window=3))[0], NearRepeatBan
    )
    with pytest.raises(ConfigError, match="no_repeat_word_window"):
        GenerationSettings(no_repeat_word_window=-1).validate()

    # in generate(): a head pushed to say one word again and again says it once per window
    head = make_head(tokenizer)
    with torch.no_grad():
        head.decoder.lm_head.weight.zero_()
        head.decoder.lm_head.weight[vocab["effusion"]] = 1.0
        head.decoder.lm_head.weight[vocab["."]] = 0.5
        # the final layer norm's output sums to its bias over the features (zero by default, where "effusion"
        # would tie with every other word up to rounding): a positive bias makes it win outright
        head.decoder.transformer.ln_f.bias.fill_(1.0)
    feats, boxes, hints = inputs()
    plain = head.generate(
        patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=1, max_new_tokens=9
    )
    ruled = head.generate(
        patch_features=feats,
        patch_boxes=boxes,
        keywords=hints,
        num_beams=2,
        max_new_tokens=9,
        logits_processor=[rule],
    )
    for row in ruled.sequences.tolist():
        words = [t for t in row if t not in (head.pad_id, head.eos_id)]
        for i, t in enumerate(words):
            assert t not in words[max(0, i - 3) : i] or not rule.bannable[t]
    assert (plain.sequences == vocab["effusion"]).sum(1).max() > (ruled.sequences == vocab["effusion"]).sum(
        1
    ).max()

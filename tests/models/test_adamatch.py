from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medvl.config import CONFIG_ROOT, load_config
from medvl.errors import RunError
from medvl.models.adamatch import (
    AdaMatchConfig,
    AdaMatchRun,
    build_adamatch,
    contrastive_loss,
    select_words,
    token_scores,
    word_loss,
)
from medvl.models.adamatch.encoders import pool_words
from medvl.text.tokenizer import ReportTokenizer, train_wordpiece
from medvl.train.stages.adamatch import AdaMatchStageConfig
from tests.models.adamatch_fixtures import gather_inputs, gather_worker, train_tiny_run


def slow_scores(img, txt, i2t_mask, t2i_mask, weight=None):
    """Reference: explicit loops over images, reports, patches and words."""
    bi, bt = img.shape[0], txt.shape[0]
    s_i2t = torch.zeros(bi, bt, dtype=torch.float64)
    s_t2i = torch.zeros(bi, bt, dtype=torch.float64)
    for i in range(bi):
        for j in range(bt):
            words = [w for w in range(txt.shape[1]) if i2t_mask[j, w]]
            s_i2t[i, j] = (
                sum(max(float(img[i, p] @ txt[j, w]) for w in words) for p in range(img.shape[1]))
                / img.shape[1]
            )
            real = [w for w in range(txt.shape[1]) if t2i_mask[j, w]]
            wt = {w: (1.0 if weight is None else float(weight[j, w])) for w in real}
            s_t2i[i, j] = sum(
                wt[w] * max(float(img[i, p] @ txt[j, w]) for p in range(img.shape[1])) for w in real
            ) / max(sum(wt.values()), 1e-6)
    return s_i2t, s_t2i


def slow_loss(s_i2t, s_t2i, scale, groups):
    b = s_i2t.shape[0]
    total = 0.0
    for s in (s_i2t, s_t2i.t()):
        loss = 0.0
        for i in range(b):
            logits = [scale * float(s[i, j]) for j in range(b)]
            m = max(logits)
            lse = m + torch.log(torch.tensor([sum(torch.exp(torch.tensor(x - m)) for x in logits)])).item()
            pos = [j for j in range(b) if groups[i] == groups[j]]
            loss += lse - math.log(sum(math.exp(logits[j] - m) for j in pos)) - m  # MIL-NCE
        total += loss / b
    return total / 2


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_token_scores_and_loss_match_the_slow_reference(chunk):
    g = torch.Generator().manual_seed(0)
    b, p, w, d = 5, 6, 7, 8
    img = F.normalize(torch.randn(b, p, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, w, d, generator=g), dim=-1)
    i2t = torch.rand(b, w, generator=g) > 0.3
    i2t[:, 0] = True
    t2i = i2t & (torch.rand(b, w, generator=g) > 0.3)
    t2i[1] = False  # a report with no affirmed word (scored 0 by t2i here; the model falls back earlier)
    fast = token_scores(img, txt, i2t, t2i, chunk=chunk)
    ref = slow_scores(img, txt, i2t, t2i)
    assert torch.allclose(fast[0].double(), ref[0], atol=1e-5)
    assert torch.allclose(fast[1].double(), ref[1], atol=1e-5)
    groups = torch.tensor([0, 1, 2, 1, 3])  # reports 1 and 3 identical: shared target
    scale = 1 / 0.07
    loss = 0.5 * (contrastive_loss(scale * fast[0], groups) + contrastive_loss(scale * fast[1].t(), groups))
    assert float(loss) == pytest.approx(slow_loss(ref[0], ref[1], scale, groups.tolist()), rel=1e-4)
    plain = contrastive_loss(scale * fast[0])
    assert float(plain) == pytest.approx(float(F.cross_entropy(scale * fast[0], torch.arange(b))), rel=1e-6)
    weight = torch.rand(b, w, generator=g) * 3  # idf-style word weights in the report-to-image score
    fast_w = token_scores(img, txt, i2t, t2i, chunk=chunk, t2i_weight=weight)
    ref_w = slow_scores(img, txt, i2t, t2i, weight)
    assert torch.allclose(fast_w[1].double(), ref_w[1], atol=1e-5) and torch.equal(fast_w[0], fast[0])


def slow_word_loss(img, txt, affirmed, ids, scale):
    """Reference word-level loss: loops over reports, words and images."""
    b = img.shape[0]
    terms = []
    for j in range(b):
        for w in range(txt.shape[1]):
            if not affirmed[j, w]:
                continue
            logits = [
                scale * max(float(img[i, p] @ txt[j, w]) for p in range(img.shape[1])) for i in range(b)
            ]
            pos = [
                i
                for i in range(b)
                if i == j or any(affirmed[i, v] and ids[i, v] == ids[j, w] for v in range(txt.shape[1]))
            ]
            m = max(logits)
            terms.append(
                math.log(sum(math.exp(x - m) for x in logits))
                - math.log(sum(math.exp(logits[i] - m) for i in pos))
            )
    return sum(terms) / len(terms)


@pytest.mark.parametrize("chunk", [1, 4])
def test_word_loss_matches_the_slow_reference(chunk):
    g = torch.Generator().manual_seed(1)
    b, p, w, d = 5, 6, 4, 8
    img = F.normalize(torch.randn(b, p, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, w, d, generator=g), dim=-1)
    ids = torch.randint(10, 14, (b, w), generator=g)  # few distinct words: many shared between reports
    affirmed = torch.rand(b, w, generator=g) > 0.3
    affirmed[2] = False  # a report without affirmed words adds no term
    _, _, best = token_scores(img, txt, affirmed | True, affirmed, chunk=chunk, word_best=True)
    assert best.shape == (b, b, w)
    scale = torch.tensor(1 / 0.07)
    fast = word_loss(best, affirmed, ids, scale)
    assert float(fast) == pytest.approx(slow_word_loss(img, txt, affirmed, ids, float(scale)), rel=1e-4)
    # an image whose report affirms the word is a positive, not a negative: making every id distinct changes it
    distinct = torch.arange(b * w).view(b, w)
    assert float(word_loss(best, affirmed, distinct, scale)) != pytest.approx(float(fast), rel=1e-3)
    assert float(word_loss(best, affirmed, distinct, scale)) == pytest.approx(
        slow_word_loss(img, txt, affirmed, distinct, float(scale)), rel=1e-4
    )


def test_model_with_the_word_term_adds_it_to_the_loss(toy):
    model, images, batch = _tiny_model_and_batch(toy)
    with torch.no_grad():
        base = model(images, **batch)
        model.cfg.word_loss_weight = 0.5
        both = model(images, **batch)
    assert float(both["loss_word"]) > 0 and "loss_word" not in base
    assert float(both["loss"]) == pytest.approx(
        float(base["loss"]) + 0.5 * float(both["loss_word"]), rel=1e-5
    )


def test_select_words_keeps_masked_positions_in_order():
    feats = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    wm = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    mm = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    sel, w, m = select_words(feats, wm, mm)
    assert sel[0, :, 0].tolist() == [1, 3, 4] and w[0].all()
    assert sel[1, 0, 0] == 5 and w[1].tolist() == [True, False, False]
    assert m[0].tolist() == [True, False, True]


def test_pool_words_averages_pieces():
    h = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    ids = torch.tensor([[-1, 0, 0, 1]])
    out = pool_words(h, ids)
    assert out[0, :, 0].tolist() == [1.0, 3.0, 3.0, 8.0]


def _tiny_model(tok):
    cfg = load_config(AdaMatchStageConfig, CONFIG_ROOT / "adamatch" / "tiny.yaml").model
    torch.manual_seed(0)
    return cfg, build_adamatch(cfg, tok)


@pytest.fixture(scope="module")
def toy(tiny_prepared):
    from medvl.data.prepared import PreparedDataset

    ds = PreparedDataset(tiny_prepared, "train")
    tok = ReportTokenizer(train_wordpiece(list(ds.index["report"]), 200, 1), 48, 24)
    tok.fit_idf(list(ds.index["report"]))
    return ds, tok


def _tiny_model_and_batch(toy, n: int = 6):
    """The tiny model in eval mode, the first ``n`` training images and their tokenised reports."""
    ds, tok = toy
    _, model = _tiny_model(tok)
    model.eval()
    items = [ds[i] for i in range(n)]
    return model, torch.stack([x["image"] for x in items]), tok([x["report"] for x in items])


def test_model_loss_equals_the_reference_on_its_own_encodings(toy):
    model, images, batch = _tiny_model_and_batch(toy)
    with torch.no_grad():
        out = model(images, **batch)
        patches = model.encode_image(images)
        tokens = model.encode_text(**batch)
    img = F.normalize(patches.features, dim=-1)
    txt = F.normalize(tokens.features, dim=-1)
    ref = slow_scores(img, txt, tokens.word_mask, tokens.match_mask, tokens.word_weight)
    scale = float(model.logit_scale.detach().exp())
    expected = slow_loss(ref[0], ref[1], scale, list(range(6)))
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-4)
    # negated words are in the i2t mask but not the t2i mask
    assert bool((tokens.word_mask & ~tokens.match_mask).any())


def test_training_lowers_the_loss_and_moves_the_patches(toy):
    ds, tok = toy
    _, model = _tiny_model(tok)
    items = [ds[i] for i in range(12)]
    images = torch.stack([x["image"] for x in items])
    batch = tok([x["report"] for x in items])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(images, **batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.6 * losses[0]
    assert float(out["mean_shift"]) > 0  # the adaptive layer learned to move


def test_local_pretrained_text_encoder(tmp_path, toy):
    from transformers import BertConfig, BertModel

    ds, tok = toy
    bert_dir = tmp_path / "tiny-bert"
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    BertModel(cfg).save_pretrained(str(bert_dir))
    tok.hf.save_pretrained(str(bert_dir))
    stage_cfg = load_config(
        AdaMatchStageConfig, CONFIG_ROOT / "adamatch" / "tiny.yaml", [f"model.text.pretrained={bert_dir}"]
    )
    model = build_adamatch(stage_cfg.model, tok)
    ref = BertModel.from_pretrained(str(bert_dir), local_files_only=True)
    assert torch.equal(
        model.text_encoder.encoder.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight
    )
    items = [ds[i] for i in range(4)]
    out = model(torch.stack([x["image"] for x in items]), **tok([x["report"] for x in items]))
    out["loss"].backward()
    assert model.text_encoder.encoder.embeddings.word_embeddings.weight.grad is not None
    # the run stands alone: saved and reloaded without the original directory
    run = AdaMatchRun(model, tok)
    assert run.save_pretrained(tmp_path / "run") == tmp_path / "run"
    import shutil

    shutil.rmtree(bert_dir)
    again = AdaMatchRun.from_pretrained(tmp_path / "run")
    x = torch.stack([x["image"] for x in items])
    assert torch.allclose(
        again.scores(x, ["Cardiomegaly."])[1], run.scores(x, ["Cardiomegaly."])[1], atol=1e-5
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_prepared, tmp_path_factory):
    return train_tiny_run(tiny_prepared, tmp_path_factory.mktemp("am") / "run")


def test_run_roundtrip_keywords_and_keypatches(tiny_run, tiny_prepared):
    from medvl.data.prepared import PreparedDataset
    from medvl.version import __version__

    run = AdaMatchRun.from_pretrained(tiny_run)
    meta = json.loads((tiny_run / "adamatch" / "config.json").read_text())
    assert meta["format"] == "medvl.adamatch" and meta["layout"] == 2 and meta["medvl_version"] == __version__
    assert meta["config"]["patches"]["mode"] == "adaptive"
    for part, fmt in (("keywords", "medvl.keywords"), ("keypatches", "medvl.keypatches")):
        assert json.loads((tiny_run / "adamatch" / part / "config.json").read_text())["format"] == fmt
        assert (tiny_run / "adamatch" / part / "model.safetensors").is_file()
    assert run.embed_dim == 32 and run.image_size == 64
    ds = PreparedDataset(tiny_prepared, "test")
    images = torch.stack([ds[i]["image"] for i in range(3)])
    patches = run.encode_images(images)
    p = run.model.num_patches
    assert patches.features.shape == (3, p, 32) and patches.boxes.shape == (3, p, 4)
    tok = run.tokenize(["Small left pleural effusion.", "Cardiomegaly."])
    text = run.model.encode_text(**tok)
    assert text.features.shape[:2] == tok["input_ids"].shape and text.word_mask.dtype == torch.bool

    assert 0 < len(run.keywords) <= 40 and "effusion" in run.keywords.words
    assert "no" not in run.keywords.words and "the" not in run.keywords.words
    kws = run.image_keywords(images, top_k=4)
    assert len(kws) == 3 and all(len(row) == 4 for row in kws)
    for row in kws:
        assert [k.score for k in row] == sorted([k.score for k in row], reverse=True)
        for k in row:
            assert k.word in run.keywords.words and 0 <= k.box[0] <= k.box[2] <= 1 and 0 <= k.patch < p

    kp = run.report_keypatches(["Small left pleural effusion.", "Cardiomegaly. No effusion."], top_k=5)
    assert kp.features.shape == (2, 5, 32) and kp.boxes.shape == (2, 5, 4) and kp.scores.shape == (2, 5)
    assert kp.entries.shape == (2, 5) and kp.entries.dtype == torch.int64
    assert (kp.scores[:, :-1] >= kp.scores[:, 1:]).all()
    assert len(kp.words) == 2 and len(kp.words[0]) == 5

    # the copy another stage keeps is loadable from that run
    from medvl.models.pretrained import copy_component

    other = tiny_run.parent / "report_run"
    assert copy_component(tiny_run, other / AdaMatchRun.DIRNAME) == other / "adamatch"
    again = AdaMatchRun.from_pretrained(other)
    assert torch.allclose(again.encode_images(images).features, patches.features)


def test_bad_runs_and_inputs_raise_clear_errors(tiny_run, tmp_path):
    from medvl.errors import InvalidImageError, InvalidReportError

    with pytest.raises(RunError, match="no AdaMatch model"):
        AdaMatchRun.from_pretrained(tmp_path)
    with pytest.raises(RunError, match="does not exist"):
        AdaMatchRun.from_pretrained(tmp_path / "missing")
    run = AdaMatchRun.from_pretrained(tiny_run)
    with pytest.raises(InvalidImageError, match="range"):
        run.encode_images(torch.rand(1, 1, 64, 64) * 4000)
    with pytest.warns(UserWarning, match="look like"):
        run.encode_images(torch.rand(1, 1, 64, 64) * 255)  # 8-bit pixels: medvl wants [-1024, 1024]
    with pytest.raises(InvalidReportError):
        run.report_keypatches([""])


def test_config_rejects_bad_values():
    from medvl.errors import ConfigError

    with pytest.raises(ConfigError):
        load_config(AdaMatchStageConfig, None, ["model.temperature=0"])
    with pytest.raises(ConfigError, match="model.patches.mode"):
        load_config(AdaMatchStageConfig, None, ["model.patches.mode=boxes"])
    assert isinstance(AdaMatchConfig().embed_dim, int)


def test_medvl_train_adamatch_through_the_shared_loop(tiny_prepared, tmp_path):
    from medvl.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "adamatch",
                "--config",
                "tiny",
                "--data",
                str(tiny_prepared),
                "--out",
                str(out),
                "--set",
                "train.steps=2",
                "--set",
                "train.eval_every=2",
            ]
        )
        == 0
    )
    info = json.loads((out / "stage.json").read_text())
    assert info["stage"] == "adamatch" and "val_score" in info["best_metrics"]
    run = AdaMatchRun.from_pretrained(out)
    assert len(run.keywords) > 0 and len(run.keypatch_bank) > 0
    assert (
        main(
            [
                "train",
                "adamatch",
                "--config",
                "tiny",
                "--data",
                str(tiny_prepared),
                "--out",
                str(tmp_path / "r2"),
                "--set",
                "model.patches.grid=two",
            ]
        )
        == 2
    )  # a bad override is a one-line error


def test_groups_merge_identical_and_normal_reports_and_abnormal_oversampling(tiny_prepared):
    from medvl.train.stages.adamatch import build_stage, report_groups

    labels = torch.full((4, 14), float("nan"))
    labels[0, 0] = labels[3, 0] = 1.0  # "No Finding"
    g = report_groups(["Clear.", "Effusion.", " effusion. ", "Normal chest."], labels)
    assert g[0] == g[3] and g[1] == g[2] and g[0] != g[1]
    g = report_groups(["Clear.", "Effusion.", " effusion. ", "Normal chest."])
    assert g[0] != g[3] and g[1] == g[2]

    stage = build_stage(
        config_path=CONFIG_ROOT / "adamatch" / "tiny.yaml",
        overrides=["oversample_abnormal=3"],
        data=tiny_prepared,
    )
    base = stage.train_ds
    abnormal = int((base.labels[:, 0] != 1.0).sum())
    assert len(stage.train_dataset()) == len(base) + 2 * abnormal
    batch = stage.collate([base[i] for i in range(6)])
    assert batch["groups"].shape == (6,) and batch["images"].shape == (6, 1, 64, 64)
    assert batch["word_key"].shape == batch["input_ids"].shape  # stem ids for the word-level term
    assert ((batch["word_key"] > 0) == batch["word_mask"]).all()


def test_negatives_gathered_across_two_processes_match_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from medvl.models.adamatch.losses import pair_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    img, txt, i2t, t2i, groups = gather_inputs()
    x = img.clone().requires_grad_(True)
    li, lt = pair_loss(x, txt, i2t, t2i, torch.tensor(10.0), groups)
    full = 0.5 * (li + lt)
    full.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert float(sum(r["loss"] for r in ranks) / 2) == pytest.approx(float(full.detach()), rel=1e-5)
    # each rank's slice gets every rank's loss gradient; DDP's averaging divides by the world size
    assert torch.allclose(torch.cat([r["grad"] for r in ranks]) / 2, x.grad, atol=1e-6)


def test_a_run_in_the_older_layout_names_the_version_that_reads_it(tiny_run, tmp_path):
    """Layout 1 (``adamatch/adamatch.json``, no config.json) is refused in one line naming medvl 0.1.x."""
    import shutil

    from medvl.version import __version__

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    art = old / "adamatch"
    meta = json.loads((art / "config.json").read_text())
    (art / "config.json").unlink()
    (art / "adamatch.json").write_text(json.dumps({"format": "medvl-adamatch/1", "model": meta["config"]}))
    with pytest.raises(RunError) as err:
        AdaMatchRun.from_pretrained(old)
    message = str(err.value)
    assert "\n" not in message and str(art) in message
    assert f"saved by medvl 0.1.x (layout 1); this medvl {__version__} reads layout 2" in message
    assert "load it with medvl 0.1.x or train it again" in message


def test_lexical_path_keeps_word_identity(toy):
    ds, tok = toy
    cfg = load_config(AdaMatchStageConfig, CONFIG_ROOT / "adamatch" / "tiny.yaml").model
    assert cfg.text.lexical
    torch.manual_seed(0)
    model = build_adamatch(cfg, tok).eval()
    assert model.text_encoder.lexical is not None
    enc = tok.encode(["Small left pleural effusion.", "Effusion. Cardiomegaly."])
    with torch.no_grad():
        feats = model.encode_text(**enc.tensors()).features
        # the lexical path is the projected input embeddings, pooled per word
        emb = model.text_encoder.encoder.get_input_embeddings()(enc.input_ids)
        ctx = model.text_encoder.proj(
            model.text_encoder.encoder(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask
            ).last_hidden_state
        )
    expected = pool_words(ctx + model.text_encoder.lexical(emb), enc.word_ids)
    assert torch.allclose(feats, expected, atol=1e-5)


def test_word_term_matches_words_by_their_word_key(toy):
    model, images, batch = _tiny_model_and_batch(toy)
    model.cfg.word_loss_weight = 1.0
    with torch.no_grad():
        by_piece = model(images, **batch)["loss_word"]
        same_partition = torch.where(batch["word_mask"], batch["input_ids"] + 1, 0)
        again = model(images, **batch, word_key=same_partition)["loss_word"]
        one_stem = torch.where(batch["word_mask"], 7, 0)  # every word the same: every image is a positive
        pooled = model(images, **batch, word_key=one_stem)["loss_word"]
    assert float(again) == pytest.approx(float(by_piece), rel=1e-6)
    assert float(by_piece) > 0.1 and float(pooled) < 0.5 * float(by_piece)


def test_adamatch_resume_in_a_fresh_stage_is_exact(tiny_prepared, tmp_path):
    """Crash during step 5, resume with a newly built stage (its tokenizer retrained, as a new process or another
    DDP rank does): the same weights and tokenizer as an uninterrupted run."""
    from safetensors.torch import load_file

    from medvl.train.loop import fit
    from medvl.train.stages.adamatch import build_stage

    def stage():
        return build_stage(
            config_path=CONFIG_ROOT / "adamatch" / "tiny.yaml",
            data=tiny_prepared,
            overrides=["train.eval_every=0", "model.word_loss_weight=1.0"],
        )

    fit(stage(), tmp_path / "straight")
    crashing = stage()
    step = crashing.training_step
    calls = []

    def crash_at_five(model, batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return step(model, batch)

    crashing.training_step = crash_at_five
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashing, tmp_path / "resumed")
    fit(stage(), tmp_path / "resumed", resume=True)
    a, b = (load_file(str(tmp_path / r / "adamatch" / "model.safetensors")) for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    vocab = [
        json.loads((tmp_path / r / "adamatch" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
        for r in ("straight", "resumed")
    ]
    assert vocab[0] == vocab[1]

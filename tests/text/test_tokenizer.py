from __future__ import annotations

import math

import pytest
import torch

from medvl.errors import ConfigError, InvalidReportError
from medvl.text.tokenizer import (
    ReportTokenizer,
    load_hf_tokenizer,
    negated_spans,
    train_wordpiece,
    word_key_id,
    word_stem,
)

REPORTS = [
    "Small left pleural effusion. No pneumothorax.",
    "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Cardiomegaly with pulmonary vascular congestion.",
    "Right lower lobe opacity concerning for pneumonia.",
] * 3


@pytest.fixture(scope="module")
def tok() -> ReportTokenizer:
    return ReportTokenizer(
        train_wordpiece(REPORTS, vocab_size=120, min_frequency=1), max_tokens=64, max_words=32
    )


def test_pieces_map_to_words_and_masks_mark_content(tok):
    enc = tok.encode(["Small left pleural effusion. No pneumothorax."])
    words = [w.text for w in enc.words[0]]
    assert words == ["Small", "left", "pleural", "effusion", ".", "No", "pneumothorax", "."]
    ids = enc.word_ids[0]
    assert ids[0] == -1 and ids[int(enc.attention_mask[0].sum()) - 1] == -1  # [CLS], [SEP]
    # every word's first piece is found, in order, and pieces of one word share its id
    firsts = [int(torch.nonzero(ids == j)[0]) for j in range(len(words))]
    assert firsts == sorted(firsts)
    marked = [enc.words[0][int(ids[t])].text for t in torch.nonzero(enc.word_mask[0]).flatten()]
    affirmed = [enc.words[0][int(ids[t])].text for t in torch.nonzero(enc.match_mask[0]).flatten()]
    assert marked == ["Small", "left", "pleural", "effusion", "pneumothorax"]  # no "No", no punctuation
    assert affirmed == ["Small", "left", "pleural", "effusion"]  # negated "pneumothorax" left out


def test_negated_phrase_words_are_out_of_the_match_mask(tok):
    enc = tok.encode(["The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal."])
    neg = {w.text.lower() for w in enc.words[0] if w.negated}
    assert {"effusion", "pneumothorax"} <= neg
    assert "lungs" not in neg
    text = "Cardiomegaly. No focal consolidation."
    covered = " ".join(text[a:e] for a, e in negated_spans(text))
    assert "consolidation" in covered and "Cardiomegaly" not in covered


def test_word_cap_and_padding(tok):
    small = ReportTokenizer(tok.hf, max_tokens=64, max_words=3)
    enc = small.encode(["Small left pleural effusion with cardiomegaly.", "Cardiomegaly."])
    assert enc.word_mask.sum(1).tolist() == [3, 1]
    assert enc.input_ids.shape == enc.word_ids.shape == enc.match_mask.shape
    assert (enc.word_ids[1][enc.attention_mask[1] == 0] == -1).all()


def test_empty_reports_are_rejected(tok):
    with pytest.raises(InvalidReportError, match="empty"):
        tok.encode(["Cardiomegaly.", "   "])


def test_save_and_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    again = ReportTokenizer.from_pretrained(tmp_path / "tok")
    a, b = tok(REPORTS[:3]), again(REPORTS[:3])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.max_words == tok.max_words


def test_local_hf_tokenizer_directory(tok, tmp_path):
    tok.hf.save_pretrained(str(tmp_path / "hf"))
    hf = load_hf_tokenizer(tmp_path / "hf")
    assert hf.is_fast
    with pytest.raises(ConfigError, match="does not exist"):
        load_hf_tokenizer(tmp_path / "nowhere")


def test_idf_weights_favour_rare_affirmed_words(tok):
    t = ReportTokenizer(tok.hf)
    t.fit_idf(REPORTS)
    # "effusion" is in 6 of 12 reports but affirmed in 3 of them; "cardiomegaly" affirmed in 3; "lungs" in 3
    assert t.weight("cardiomegaly") == pytest.approx(math.log(13 / 4))
    assert t.weight("effusion") == pytest.approx(math.log(13 / 4))
    assert t.weight("pneumothorax") == t.idf_default  # only ever negated: as rare as an unseen word
    enc = t.encode(["Small left pleural effusion."])
    w = enc.word_weight[0]
    assert (w[~enc.word_mask[0]] == 0).all() and (w[enc.word_mask[0]] > 0).all()


@pytest.mark.parametrize(
    "forms",
    [
        ("granuloma", "granulomas", "granulomatous", "granulomata", "Granuloma"),
        ("opacity", "opacities"),
        ("effusion", "effusions"),
        ("mass", "masses"),
        ("atelectasis", "atelectatic"),
        ("emphysema", "emphysematous"),
    ],
)
def test_word_stem_pools_a_words_forms(forms):
    assert len({word_stem(w) for w in forms}) == 1


def test_word_stem_keeps_different_words_apart():
    words = [
        "granuloma",
        "nodule",
        "mass",
        "opacity",
        "effusion",
        "atelectasis",
        "cardiomegaly",
        "cardiomediastinal",
        "hiatus",
        "lung",
        "lungs",
        "clip",
        "clips",
    ]
    assert len({word_stem(w) for w in words}) == len(words) - 2  # lung(s) and clip(s) pool, nothing else


def test_word_keys_mark_content_words_by_stem(tok):
    enc = tok.encode(["Small left pleural effusions. No pneumothorax.", "Right pleural effusion."])
    assert enc.word_key.shape == enc.input_ids.shape
    assert ((enc.word_key > 0) == enc.word_mask).all()  # a key exactly where a content word starts
    key = {
        enc.words[b][int(enc.word_ids[b, t])].text: int(enc.word_key[b, t])
        for b in range(2)
        for t in torch.nonzero(enc.word_mask[b]).flatten()
    }
    assert key["effusions"] == key["effusion"] == word_key_id("effusion")
    assert key["left"] != key["Right"] and key["pleural"] == word_key_id("pleural")


def test_wordpiece_training_is_deterministic():
    # tokenizers' trainer numbers "##c" pieces in hash-map order (huggingface/tokenizers#1794): on these two
    # reports it gave a different vocabulary in each of 30 runs before medvl registered the pieces up front.
    texts = [
        "Mild cardiomegaly with a small left pleural effusion and bibasilar atelectasis.",
        "Calcified granuloma in the right upper lobe. No pneumothorax or focal consolidation.",
    ] * 2
    vocabs = {
        tuple(sorted(train_wordpiece(texts, vocab_size=80, min_frequency=1).get_vocab().items()))
        for _ in range(10)
    }
    assert len(vocabs) == 1
    tok = train_wordpiece(texts, vocab_size=80, min_frequency=1)
    assert sorted(tok.all_special_tokens) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert "[UNK]" not in tok.tokenize("Calcified granuloma. Left effusion.")

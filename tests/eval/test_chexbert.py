"""CheXbert as a second labeler: a randomly initialised checkpoint in CheXbert's format with a tiny BERT config and
vocabulary, all written by the test; nothing is downloaded."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from medvl.errors import ConfigError, RunError
from medvl.eval.chexbert import CHEXBERT_CONDITIONS, CheXbertLabeler, parse_labeler
from medvl.eval.clinical import ReferenceLabels, ce_metrics, load_labeler, renamed
from medvl.text.chexpert import CHEXPERT_LABELS

WORDS = "the heart is enlarged no pleural effusion lungs are clear small left right edema".split()
REPORTS = [
    "The heart is enlarged.",
    "No pleural effusion.\nLungs are clear.",
    "",
    "small left effusion " * 200,
]


class ReferenceBertLabeler(nn.Module):
    """CheXbert's bert_labeler as its authors wrote it (13 heads of 4 classes, No Finding of 2)."""

    def __init__(self, config):
        super().__init__()
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(0.1)
        hidden = self.bert.pooler.dense.in_features
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4, bias=True) for _ in range(13)])
        self.linear_heads.append(nn.Linear(hidden, 2, bias=True))

    def forward(self, source_padded, attention_mask):
        final_hidden = self.bert(source_padded, attention_mask=attention_mask)[0]
        cls_hidden = self.dropout(final_hidden[:, 0, :].squeeze(dim=1))
        return [self.linear_heads[i](cls_hidden) for i in range(14)]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was tried")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def chexbert_files(tmp_path):
    bert = tmp_path / "bert-tiny"
    bert.mkdir()
    (bert / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n"
    )
    config = BertConfig(
        vocab_size=len(WORDS) + 6,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.save_pretrained(str(bert))
    torch.manual_seed(0)
    ref = ReferenceBertLabeler(config).eval()
    state = {"module." + k: v for k, v in ref.state_dict().items()}
    ckpt = tmp_path / "chexbert.pth"
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {}}, ckpt)
    return ckpt, bert, ref


def _expected(ref, labeler, texts):
    enc = labeler.tokenizer(
        [labeler.prepare(t) for t in texts], truncation=True, max_length=64, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return ref(enc["input_ids"], enc["attention_mask"])


def test_loads_the_checkpoint_and_maps_the_heads(chexbert_files):
    ckpt, bert, ref = chexbert_files
    labeler = load_labeler(f"chexbert:{ckpt},bert={bert}")
    assert isinstance(labeler, CheXbertLabeler)
    # same logits as the reference module holding the checkpoint's weights
    got = labeler.logits(REPORTS)
    want = _expected(ref, labeler, REPORTS)
    assert [g.shape[1] for g in got] == [4] * 13 + [2]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # each head's argmax lands in its CheXpert column: blank NaN, positive 1, negative 0, uncertain -1
    labels = labeler.label_reports(REPORTS)
    assert labels.shape == (len(REPORTS), 14)
    values = {0: math.nan, 1: 1.0, 2: 0.0, 3: -1.0}
    for j, name in enumerate(CHEXBERT_CONDITIONS):
        col = CHEXPERT_LABELS.index(name)
        for i, cls in enumerate(want[j].argmax(1).tolist()):
            expected = values[cls]
            assert (math.isnan(labels[i, col]) and math.isnan(expected)) or labels[i, col] == expected


def test_forced_classes_reach_the_right_columns(chexbert_files, tmp_path):
    ckpt, bert, ref = chexbert_files
    with torch.no_grad():  # head j predicts class j % 4 (No Finding: positive) whatever the text
        for j, head in enumerate(ref.linear_heads):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[j % 4 if j < 13 else 1] = 10.0
    torch.save(
        {"model_state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "f.pth"
    )
    labels = CheXbertLabeler.load(f"chexbert:{tmp_path / 'f.pth'},bert={bert}").label_reports(["x", "heart"])
    row = dict(zip(CHEXPERT_LABELS, labels[0], strict=True))
    assert math.isnan(row["Enlarged Cardiomediastinum"])  # head 0 -> blank
    assert row["Cardiomegaly"] == 1 and row["Lung Opacity"] == 0 and row["Lung Lesion"] == -1
    assert row["No Finding"] == 1
    # beside medvl's labeler: the same ce keys under ce_chexbert.
    second = ReferenceLabels(CheXbertLabeler.load(f"chexbert:{tmp_path / 'f.pth'},bert={bert}"), ["a", "b"])
    m = second.metrics(["c", "d"])
    assert m["ce_chexbert.micro5.f1"] == 1.0 and m["ce_chexbert.example.f1"] == 1.0
    assert set(m) == set(renamed(ce_metrics(labels, labels), "ce_chexbert."))


def test_errors_name_what_is_missing(chexbert_files, tmp_path):
    ckpt, bert, _ = chexbert_files
    with pytest.raises(RunError, match="nope.pth does not exist"):
        CheXbertLabeler.load(f"chexbert:{tmp_path / 'nope.pth'},bert={bert}")
    with pytest.raises(RunError, match="no config.json"):
        CheXbertLabeler.load(f"chexbert:{ckpt},bert={tmp_path}")
    # without bert=DIR: bert-base's architecture, which this tiny checkpoint does not fit, or no vocabulary
    with pytest.raises(RunError, match="bert-base|vocabulary"):
        CheXbertLabeler.load(f"chexbert:{ckpt}")
    torch.save({"model_state_dict": {"module.bert.x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(RunError, match="not a CheXbert checkpoint"):
        CheXbertLabeler.load(f"chexbert:{tmp_path / 'other.pth'},bert={bert}")
    with pytest.raises(ConfigError, match="chexbert:CKPT"):
        parse_labeler("radgraph:x")
    assert parse_labeler("chexbert:/a/c.pth,bert=/b").bert.name == "b"
    assert CheXbertLabeler.load(f"chexbert:{ckpt},bert={bert}").label_reports([]).shape == (0, 14)
    # a vocabulary that does not fit the checkpoint's embeddings is refused
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
    with pytest.raises(RunError, match="rows"):
        CheXbertLabeler.load(f"chexbert:{ckpt},bert={bert}")


@pytest.mark.usefixtures("single_thread")
def test_evaluate_report_with_chexbert_beside_medvls_labeler(
    tiny_prepared, chexbert_files, tmp_path, monkeypatch, capsys
):
    import json

    from medvl import cli
    from medvl.eval import nlg
    from tests.models.report_fixtures import tiny_runs

    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)  # no METEOR (Java) here
    # the report evaluation's classifier-template baseline: a tiny evaluation classifier, not the default one
    import medvl.train.classifier as train_classifier
    from medvl.eval.classifier import ClassifierConfig

    tiny = ClassifierConfig(image_size=32, channels=[8, 16], steps=30, eval_every=10, batch_size=16, lr=5e-3)
    trained = train_classifier.evaluation_classifier
    monkeypatch.setattr(
        train_classifier,
        "evaluation_classifier",
        lambda data, cfg=None, device=None: trained(data, tiny, "cpu"),
    )
    runs = tiny_runs(tmp_path / "runs", tiny_prepared)
    ckpt, bert, _ = chexbert_files
    out = tmp_path / "report.json"
    argv = ["evaluate", "report", "--run", str(runs.report), "--data", str(runs.data), "--out", str(out)]
    assert cli.main([*argv, "--labeler", f"chexbert:{ckpt},bert={bert}"]) == 0
    saved = json.loads(out.read_text())
    for prefix in ("", "baselines.most_frequent."):
        for key in ("micro.f1", "macro.f1", "example.f1", "micro5.f1", "macro5.f1", "example5.f1"):
            assert f"{prefix}ce.{key}" in saved and f"{prefix}ce_chexbert.{key}" in saved, prefix + key
    assert "CheXbert" in saved["meta"]["conventions"]["ce_chexbert"]
    # a missing checkpoint is an error naming it, before any report is generated
    assert cli.main([*argv, "--labeler", f"chexbert:{tmp_path / 'gone.pth'},bert={bert}"]) != 0
    assert "gone.pth does not exist" in capsys.readouterr().err
    # --features belongs to the diffusion evaluation
    assert cli.main([*argv, "--features", "xrv:/nowhere.pt"]) != 0
    assert "--features applies to `medvl evaluate diffusion`" in capsys.readouterr().err

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvl.eval.alignment import (
    PointingRecord,
    SplitEncoding,
    encode_split,
    localization_metrics,
    retrieval_metrics,
    word_variants,
)
from medvl.models.adamatch import ImagePatches, TextTokens, select_words
from medvl.text.tokenizer import ReportTokenizer, train_wordpiece


def _enc(img, txt, reports):
    n, w = txt.shape[:2]
    mask = torch.ones(n, w, dtype=torch.bool)
    return SplitEncoding(
        F.normalize(img, dim=-1),
        torch.zeros(n, img.shape[1], 4),
        F.normalize(txt, dim=-1),
        mask,
        mask,
        reports,
    )


def test_retrieval_perfect_shuffled_and_duplicates():
    d = 8
    basis = torch.eye(d)
    img = basis[:6].unsqueeze(1).repeat(1, 2, 1)  # image i: two patches along axis i
    txt = basis[:6].unsqueeze(1)  # report i: one word along axis i
    m = retrieval_metrics(_enc(img, txt, [f"report {i}" for i in range(6)]))
    assert m["i2t_r1"] == m["t2i_r1"] == m["i2t_r5"] == 1.0
    # reports 0 and 1 swapped: images 0 and 1 retrieve each other's report ...
    txt_bad = txt.clone()
    txt_bad[[0, 1]] = txt[[1, 0]]
    m = retrieval_metrics(_enc(img, txt_bad, [f"report {i}" for i in range(6)]))
    assert m["i2t_r1"] == pytest.approx(4 / 6) and m["t2i_r1"] == pytest.approx(4 / 6)
    # ... which is no error when reports 0 and 1 are the same text
    m = retrieval_metrics(_enc(img, txt_bad, ["Same.", "same. "] + [f"report {i}" for i in range(2, 6)]))
    assert m["i2t_r1"] == 1.0 and m["t2i_r1"] == 1.0


class StandIn(nn.Module):
    """Four fixed patches (a 2 x 2 grid); the word "effusion" points at patch 3, every other word at patch 0."""

    def __init__(self, tok: ReportTokenizer):
        super().__init__()
        self.tok = tok
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, images):
        b = images.shape[0]
        boxes = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]).expand(
            b, 4, 4
        )
        feats = torch.eye(4).expand(b, 4, 4)
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        z = torch.zeros(b, 4, 2)
        return ImagePatches(feats, boxes, centres, centres[:, :, None], z, z + 1, torch.zeros(()))

    def encode_text(self, input_ids, attention_mask, word_ids, word_mask, match_mask, word_weight=None):
        pieces = [self.tok.hf.convert_ids_to_tokens(row) for row in input_ids.tolist()]
        feats = torch.zeros(*input_ids.shape, 4)
        for b, row in enumerate(pieces):
            for t, piece in enumerate(row):
                feats[b, t, 3 if piece.startswith("effusion") else 0] = 1.0
        return TextTokens(feats, word_mask, match_mask)

    def select(self, tokens):
        return (
            *select_words(F.normalize(tokens.features, dim=-1), tokens.word_mask, tokens.match_mask),
            None,
        )


def test_pointing_game_counts_hits_chance_iou_and_skips():
    reports = ["Large right pleural effusion.", "Small left effusions.", "Cardiomegaly."]
    tok = ReportTokenizer(train_wordpiece(reports * 3, 100, 1))
    data = [{"image": torch.zeros(1, 8, 8), "report": r, "dicom_id": f"d{i}"} for i, r in enumerate(reports)]
    regions = pd.DataFrame(
        [
            {
                "dicom_id": "d0",
                "word": "effusion",
                "x0": 0.5,
                "y0": 0.5,
                "x1": 1.0,
                "y1": 1.0,
            },  # patch 3 exactly
            {
                "dicom_id": "d1",
                "word": "effusion",
                "x0": 0.0,
                "y0": 0.0,
                "x1": 0.3,
                "y1": 0.3,
            },  # plural; elsewhere
            {
                "dicom_id": "d2",
                "word": "effusion",
                "x0": 0.0,
                "y0": 0.0,
                "x1": 0.3,
                "y1": 0.3,
            },  # not in the report
        ]
    )
    enc = encode_split(StandIn(tok), tok, data, batch_size=2, regions=regions)
    assert enc.skipped == {"word_not_in_report": 1}
    r0, r1 = enc.pointing
    assert (r0.hit, r0.iou) == (1.0, pytest.approx(1.0))
    assert r0.chance == pytest.approx(0.25)  # one of four centres in the widened box
    assert (r1.hit, r1.iou, r1.chance) == (0.0, 0.0, 0.25)  # pointed at patch 3, the region is in patch 0
    m = localization_metrics(enc.pointing)
    assert m["pointing_game"] == 0.5 and m["per_finding.effusion.count"] == 2
    assert enc.words.shape[0] == 3 and enc.patches.shape == (3, 4, 4)


def test_pointing_game_scores_a_word_once_per_image_over_all_its_boxes():
    """A bilateral effusion is one (image, word) pair: one patch can only land on one side, and that is a hit."""
    reports = ["Bilateral pleural effusions.", "Left effusion."]
    tok = ReportTokenizer(train_wordpiece(reports * 3, 100, 1))
    data = [{"image": torch.zeros(1, 8, 8), "report": r, "dicom_id": f"d{i}"} for i, r in enumerate(reports)]
    regions = pd.DataFrame(
        [
            {"dicom_id": "d0", "word": "effusion", "x0": 0.5, "y0": 0.5, "x1": 1.0, "y1": 1.0},  # patch 3
            {"dicom_id": "d0", "word": "effusion", "x0": 0.0, "y0": 0.5, "x1": 0.5, "y1": 1.0},  # patch 2
            {
                "dicom_id": "d1",
                "word": "effusion",
                "x0": 0.0,
                "y0": 0.0,
                "x1": 0.3,
                "y1": 0.3,
            },  # patch 0: a miss
            {
                "dicom_id": "d1",
                "word": "effusion",
                "x0": 0.0,
                "y0": 0.6,
                "x1": 0.3,
                "y1": 0.9,
            },  # patch 2: a miss too
        ]
    )
    enc = encode_split(StandIn(tok), tok, data, batch_size=2, regions=regions)
    assert [r.regions for r in enc.pointing] == [2, 2]
    r0, r1 = enc.pointing
    assert (r0.hit, r0.iou) == (1.0, pytest.approx(1.0))  # the best box is the patch-3 region, not the other
    assert r0.chance == pytest.approx(0.5)  # two of four centres fall in one of the boxes
    assert (r1.hit, r1.iou) == (0.0, 0.0) and r1.chance == pytest.approx(0.5)
    assert localization_metrics(enc.pointing)["per_finding.effusion.count"] == 2


def test_word_variants():
    assert {"effusion", "effusions"} <= word_variants("Effusion")
    assert "opacity" in word_variants("opacities") or "opacitie" in word_variants("opacities")


def test_localization_metrics_per_finding():
    recs = [
        PointingRecord("a", "effusion", 1.0, 0.2, 0.5),
        PointingRecord("b", "effusion", 0.0, 0.1, 0.1),
        PointingRecord("c", "nodule", 1.0, 0.05, 0.3),
    ]
    m = localization_metrics(recs)
    assert m["pointing_game"] == pytest.approx(2 / 3)
    assert m["pointing_game_chance"] == pytest.approx(0.35 / 3)
    assert m["per_finding.effusion.pointing_game"] == 0.5 and m["per_finding.nodule.box_iou"] == 0.3
    assert localization_metrics([]) == {}


def test_evaluate_on_tiny_prepared_writes_every_key(tiny_prepared, tiny_adamatch_run, tmp_path):
    from medvl.data.prepared import PreparedDataset
    from medvl.eval import evaluate

    out = tmp_path / "metrics.json"
    evaluate("adamatch", run=tiny_adamatch_run, data=tiny_prepared, split="test", out=out)
    m = json.loads(out.read_text())
    for key in (
        "retrieval.i2t_r1",
        "retrieval.i2t_r5",
        "retrieval.t2i_r1",
        "retrieval.t2i_r5",
        "localization.pointing_game",
        "localization.pointing_game_chance",
        "localization.box_iou",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    words = set(PreparedDataset(tiny_prepared, "test").regions()["word"])
    for w in words:
        assert f"localization.per_finding.{w}.pointing_game" in m
        assert f"localization.per_finding.{w}.pointing_game_chance" in m
        assert f"localization.per_finding.{w}.box_iou" in m
        assert m[f"localization.per_finding.{w}.count"] >= 1
    assert m["meta"]["split"] == "test" and m["meta"]["num_samples"] == 10
    assert "pointing_game" in m["meta"]["conventions"] and m["meta"]["config_hash"]
    for key in ("pointing_game_prior", "box_iou_prior", "pointing_game_centre", "pointing_game_gap_prior"):
        assert f"localization.{key}" in m, key
        low, high = m[f"localization.{key}_ci"]
        assert low <= m[f"localization.{key}"] <= high, key
    low, high = m["retrieval.t2i_r5_ci"]
    assert low <= m["retrieval.t2i_r5"] <= high
    assert m["localization.pointing_game_gap_prior"] == pytest.approx(
        m["localization.pointing_game"] - m["localization.pointing_game_prior"]
    )

"""``medvl export onnx``: a tiny report run's networks round-trip through ONNX and onnxruntime on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvl import cli
from medvl.export import onnx as export
from medvl.inference.generate import ReportGenerator
from tests.models.report_fixtures import tiny_runs

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def exported(tiny_prepared, tmp_path_factory):
    runs = tiny_runs(tmp_path_factory.mktemp("onnx_runs"), tiny_prepared)
    out = tmp_path_factory.mktemp("onnx")
    assert cli.main(["export", "onnx", "--run", str(runs.report), "--out", str(out)]) == 0
    return runs, out


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_files_and_record(exported):
    _, out = exported
    record = json.loads((out / "export.json").read_text())
    assert set(record["files"]) == {export.ENCODER_FILE, export.CONDITIONS_FILE, export.DECODER_FILE}
    for info in record["files"].values():
        assert max(info["max_abs_diff"].values()) <= export.ATOL
    assert record["opset"] >= 16  # grid_sample


def test_onnx_pipeline_matches_pytorch_greedy_decoding(exported, tiny_prepared):
    runs, out = exported
    gen = ReportGenerator.load(runs.report)
    from medvl.data.prepared import PreparedDataset

    ds = PreparedDataset(tiny_prepared, "test")
    images = torch.stack([ds[i]["image"] for i in range(3)]).float()
    # PyTorch: AdaMatch patches -> conditions -> greedy decoding without n-gram blocking
    feats, boxes, hints, _ = gen.conditions(images)
    want = gen.head.generate(
        patch_features=feats, patch_boxes=boxes, keywords=hints, num_beams=1, no_repeat_ngram_size=0
    ).sequences.numpy()
    # ONNX: the same from the exported files (keyword hints computed by medvl, as documented)
    enc = _session(out / export.ENCODER_FILE).run(None, {"images": images.numpy()})
    np.testing.assert_allclose(enc[0], feats.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(enc[1], boxes.numpy(), atol=1e-5)
    feed = {"patch_features": enc[0], "patch_boxes": enc[1]}
    if gen.head.cfg.use_keywords:
        feed.update(
            keyword_ids=hints.ids.numpy(),
            keyword_scores=hints.scores.numpy(),
            keyword_boxes=hints.boxes.numpy(),
        )
    conditions, mask = _session(out / export.CONDITIONS_FILE).run(None, feed)
    decoder = _session(out / export.DECODER_FILE)
    head = gen.head
    got = export.greedy_decode(
        lambda f: decoder.run(["logits"], f)[0],
        conditions,
        mask,
        bos=head.bos_id,
        eos=head.eos_id,
        suppress=(head.pad_id, head.bos_id, head.unk_id),
        max_length=head.cfg.max_length,
    )
    n = max(got.shape[1], want.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, n - a.shape[1])), constant_values=head.pad_id)  # noqa: E731
    np.testing.assert_array_equal(pad(got), pad(want))
    assert (got != head.pad_id).sum() > 3  # tokens were generated


def test_a_part_that_cannot_be_exported_is_named(exported, tmp_path, monkeypatch, capsys):
    runs, _ = exported

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    assert cli.main(["export", "onnx", "--run", str(runs.report), "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "image encoder cannot be exported" in err and "unsupported operator" in err
    assert not (tmp_path / export.ENCODER_FILE).exists()

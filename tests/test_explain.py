from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medvl.inference.explain import explain_command, explain_image, similarity_map
from medvl.models.adamatch import AdaMatchRun
from tests.models.adamatch_fixtures import train_tiny_run


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    return {
        "adaptive": train_tiny_run(tiny_prepared, root / "adaptive", steps=3),
        "freeform": train_tiny_run(
            tiny_prepared, root / "freeform", steps=3, overrides=["model.patches.mode=freeform"]
        ),
    }


def _scan_png(tiny_prepared, path):
    from medvl.data.prepared import PreparedDataset

    img = PreparedDataset(tiny_prepared, "test").image(1)
    Image.fromarray(np.round((img + 1024) / 2048 * 255).astype(np.uint8)).save(path)
    return path


def test_explain_command_writes_a_png_with_keywords(runs, tiny_prepared, tmp_path, capsys):
    scan = _scan_png(tiny_prepared, tmp_path / "scan.png")
    out = tmp_path / "explained.png"
    assert explain_command(scan, run=runs["adaptive"], out=out, word="effusion") == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # two panels side by side
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    printed = capsys.readouterr().out
    assert "score" in printed and "box [" in printed


def test_explain_rejects_non_png_and_missing_scan(runs, tmp_path):
    from medvl.errors import InvalidImageError

    with pytest.raises(InvalidImageError, match="png"):
        explain_command(tmp_path / "x.png", run=runs["adaptive"], out=tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError):
        explain_command(tmp_path / "missing.png", run=runs["adaptive"], out=tmp_path / "x.png")


def test_freeform_run_draws_point_sets(runs, tiny_prepared, tmp_path):
    from medvl.data.prepared import PreparedDataset

    run = AdaMatchRun.from_pretrained(runs["freeform"])
    assert run.config.patches.mode.value == "freeform"
    exp = explain_image(
        run, PreparedDataset(tiny_prepared, "test").image(0), out=tmp_path / "ff.png", word="cardiomegaly"
    )
    assert (tmp_path / "ff.png").stat().st_size > 1000
    assert exp.word_map is not None and exp.word_map.shape == (64, 64)
    assert len(exp.keywords) > 0 and exp.boxes.shape == (run.model.num_patches, 4)


def test_similarity_map_takes_the_best_covering_patch():
    boxes = np.array([[0, 0, 0.5, 1.0], [0.25, 0, 1.0, 1.0]])
    m = similarity_map(boxes, np.array([0.2, 0.7]), 8)
    assert m[0, 0] == pytest.approx(0.2)  # only patch 0 covers x < 0.25
    assert m[0, 3] == pytest.approx(0.7)  # both cover: the higher wins
    assert m[0, 7] == pytest.approx(0.7)
    m2 = similarity_map(np.array([[0, 0, 0.5, 0.5]]), np.array([1.0]), 4)
    assert np.isnan(m2[3, 3])


def test_explain_command_reads_a_dicom_as_the_runs_training_data_were(runs, tmp_path, monkeypatch):
    """The scan reaches the model as load_scan gives it, DICOMs JPG-compatible for a run trained so."""
    import json
    import shutil

    import medvl.inference.explain as explain
    from medvl.data.dicom import write_dicom
    from medvl.data.scans import load_scan
    from medvl.data.testing import chest_dataset, synthetic_chest

    scan = write_dicom(chest_dataset(synthetic_chest(70, 60, seed=4)), tmp_path / "scan.dcm")
    run = tmp_path / "run"
    shutil.copytree(runs["adaptive"], run)
    stage = run / "stage.json"  # what `medvl train` records of the data it trained on
    info = json.loads(stage.read_text()) if stage.exists() else {"stage": "adamatch"}
    info.setdefault("data", {}).setdefault("meta", {})["jpg_compatible"] = True
    stage.write_text(json.dumps(info))
    seen = []
    real = explain.explain_image
    monkeypatch.setattr(
        explain, "explain_image", lambda am, pixels, **kw: seen.append(pixels) or real(am, pixels, **kw)
    )
    for r in (runs["adaptive"], run):
        assert explain_command(scan, run=r, out=tmp_path / "x.png") == 0
    size = AdaMatchRun.from_pretrained(run).image_size
    np.testing.assert_array_equal(np.asarray(seen[0]), load_scan(scan, size)[0].numpy())
    np.testing.assert_array_equal(np.asarray(seen[1]), load_scan(scan, size, jpg_compatible=True)[0].numpy())
    assert not np.array_equal(np.asarray(seen[0]), np.asarray(seen[1]))

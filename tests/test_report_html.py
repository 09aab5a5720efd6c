"""The HTML page's parts without trained runs: rendering, the overlays' sizes, the figures, label placement."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from medvl.placement import overlaps, place_labels
from medvl.report.examples import Keypatch
from medvl.report.figures import pointing_figure, roc_curve, roc_figure, training_figure
from medvl.report.html import Section, StudyExample, render_html
from medvl.report.overlay import LABEL_PX, PIXEL_RATIO, crop, draw_boxes, wrap_words
from tests.browser import check_page

MIN_LABEL_PX = 11  # the smallest text a page may show, in CSS pixels


def _scan(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1024, 1024, (size, size)).astype(np.float32)


def _example(study: str, seed: int) -> StudyExample:
    boxes = [[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]
    return StudyExample(
        study,
        scan=draw_boxes(_scan(seed), boxes, ["effusion", "pleural", "heart"]),
        keywords=["effusion", "pleural", "heart"],
        reference="ref <b>",
        generated="gen",
        synthesized=draw_boxes(_scan(seed + 1), boxes[:1], ["effusion"]),
        keypatches=[Keypatch("effusion", crop(_scan(seed + 2), boxes[0])), Keypatch("x", None)],
        keypatch_note="not the dataset the bank was mined from",
    )


def test_render_html_is_self_contained():
    page = render_html("t", [_example("s1", 0)], [Section("Metrics", "<p>nlg.bleu4 0.100</p>")])
    assert (
        page.count("data:image/png;base64,") == 3
    )  # scan, synthesized, one crop (the other's source is gone)
    assert "http://" not in page and "https://" not in page
    assert "ref &lt;b&gt;" in page and "(no crop)" in page and "mined from" in page
    assert "image-rendering:pixelated" not in page


def test_overlay_is_drawn_at_display_resolution():
    pic = draw_boxes(_scan(0, 64), [[0.2, 0.2, 0.6, 0.6]], ["effusion"])
    image = Image.open(io.BytesIO(pic.png))
    assert image.width == pic.width * PIXEL_RATIO  # drawn for the size shown, not a 64 px scan blown up
    assert pic.label_px == LABEL_PX >= MIN_LABEL_PX
    # Smooth upsampling: a pixelated (nearest) 64 -> 720 px image has ~64 distinct columns per row.
    row = np.asarray(image.convert("L"))[image.height - 3]
    assert len(np.unique(row)) > 100


def test_long_labels_wrap_inside_the_picture():
    words = ["opacities", "right", "cardiomegaly", "atelectasis", "granulomatous", "degenerative"]
    lines = wrap_words(words, len, 30)
    assert len(lines) > 1 and all(len(line) <= 30 for line in lines)
    assert " ".join(lines) == ", ".join(words)
    assert wrap_words(["a" * 40], len, 30) == ["a" * 40]  # a word longer than a line stays whole
    pic = draw_boxes(_scan(0), [[0.0, 0.2, 0.2, 0.4]] * len(words), words)
    assert Image.open(io.BytesIO(pic.png)).width == pic.width * PIXEL_RATIO


def test_labels_never_overlap():
    boxes = [(10.0, 10.0, 60.0, 60.0)] * 6 + [(0.0, 0.0, 200.0, 15.0), (150.0, 180.0, 200.0, 200.0)]
    sizes = [(80.0, 16.0)] * len(boxes)
    rects = place_labels(boxes, sizes, 200.0, 200.0)
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 200 and 0 <= a[1] and a[3] <= 200
        assert not any(overlaps(a, b) for b in rects[i + 1 :]), (a, rects)
    assert rects[0] == (10.0, 0.0, 90.0, 16.0)  # above its box when there is room (clamped to the top)


def test_roc_curve_matches_the_rank_statistic():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.5 * y, 1)  # many ties
    _, _, auc = roc_curve(s, y)
    pos, neg = s[y], s[~y]
    mann_whitney = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert abs(auc - mann_whitney) < 1e-12


def test_figures_keep_text_legible_and_skip_what_is_missing():
    positive = np.zeros((20, 14), dtype=int)
    positive[:5, 2] = 1
    scores = {"labels": [f"l{i}" for i in range(14)], "positive": positive.tolist()}
    scores |= {
        "real": np.random.default_rng(0).random((20, 14)).tolist(),
        "synthesized": np.zeros((20, 14)).tolist(),
    }
    pic = roc_figure(scores)
    assert pic is not None and pic.label_px >= MIN_LABEL_PX
    assert Image.open(io.BytesIO(pic.png)).width // PIXEL_RATIO == pic.width
    scores["positive"] = np.zeros((20, 14), dtype=int).tolist()
    assert roc_figure(scores) is None  # no label with both classes
    assert training_figure({}, "t") is None
    assert pointing_figure({"localization.pointing_game": 0.5}) is None
    metrics = {
        "localization.per_finding.effusion.pointing_game": 0.5,
        "localization.per_finding.effusion.pointing_game_chance": 0.1,
        "localization.per_finding.effusion.count": 4,
    }
    without = pointing_figure(metrics)
    metrics["localization.per_finding.effusion.pointing_game_prior"] = 0.3
    metrics["localization.per_finding.effusion.pointing_game_centre"] = 0.2
    with_baselines = pointing_figure(metrics)
    assert without is not None and with_baselines is not None
    assert with_baselines.height > without.height  # two more bars per word


def test_report_page_loads_in_chromium(tmp_path):
    page = render_html(
        "medvl test", [_example("s1", 0), _example("s2", 3)], [Section("Metrics", "<p>retrieval</p>")]
    )
    path = tmp_path / "report.html"
    path.write_text(page)
    result = check_page(path)
    assert result.title == "medvl test"
    assert result.console_errors == [] and result.page_errors == [] and result.failed_requests == []
    assert result.images == 6 and result.broken_images == []
    for img in result.shown:
        assert img["css"] == img["attr"] and img["natural"] >= img["css"], img  # shown as drawn, not blown up
        assert img["label_px"] == 0 or img["label_px"] * img["css"] / img["attr"] >= MIN_LABEL_PX, img


def test_browser_check_catches_a_broken_image(tmp_path):
    # The check above could fail: a corrupt embedded image is reported.
    path = tmp_path / "broken.html"
    path.write_text(
        '<html><head><title>b</title></head><body><img alt="bad" src="data:image/png;base64,AAAA">'
        "</body></html>"
    )
    assert check_page(path).broken_images == ["bad"]

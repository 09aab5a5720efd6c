from __future__ import annotations

import numpy as np

from medvl.report.html import StudyExample, png_data_uri, render_html
from tests.browser import check_page


def _png(seed: int) -> bytes:
    import base64

    rng = np.random.default_rng(seed)
    uri = png_data_uri((rng.random((64, 64)) * 255).astype(np.uint8))
    return base64.b64decode(uri.split(",", 1)[1])


def test_render_html_is_self_contained():
    page = render_html(
        "t",
        [StudyExample("s1", _png(0), ["effusion"], "ref", "gen", _png(1), ["effusion"])],
        {"nlg.bleu4": 0.1, "ce.micro.f1": 0.5, "meta": {}},
    )
    assert page.count("data:image/png;base64,") == 2
    assert "http://" not in page and "https://" not in page
    assert "nlg.bleu4" in page and "0.100" in page


def test_report_page_loads_in_chromium(tmp_path):
    page = render_html(
        "medvl test",
        [
            StudyExample("s1", _png(0), ["effusion"], "ref <b>", "gen", _png(1), ["x"]),
            StudyExample("s2", _png(2), [], "r", "g", _png(3), []),
        ],
        {"retrieval.i2t_r1": 0.25},
    )
    path = tmp_path / "report.html"
    path.write_text(page)
    result = check_page(path)
    assert result.title == "medvl test"
    assert result.console_errors == [] and result.page_errors == [] and result.failed_requests == []
    assert result.images == 4 and result.broken_images == []


def test_browser_check_catches_a_broken_image(tmp_path):
    # The check above could fail: a corrupt embedded image is reported.
    path = tmp_path / "broken.html"
    path.write_text(
        '<html><head><title>b</title></head><body><img alt="bad" src="data:image/png;base64,AAAA">'
        "</body></html>"
    )
    assert check_page(path).broken_images == ["bad"]

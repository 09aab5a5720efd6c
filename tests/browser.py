"""Open a page in Debian's headless Chromium (driven by Playwright, no browser download)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageCheck:
    console_errors: list[str]
    page_errors: list[str]
    failed_requests: list[str]
    images: int
    broken_images: list[str]
    title: str
    # Per image: alt, naturalWidth, the width it is shown at (CSS px), its width attribute, data-label-px.
    shown: list[dict] = field(default_factory=list)


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get)")


def check_page(path: Path, screenshot: Path | None = None) -> PageCheck:
    exe = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    console, errors, failed = [], [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url[:80]))
        page.goto(path.resolve().as_uri(), wait_until="load")
        info = page.evaluate(
            """() => { const imgs = Array.from(document.images);
                return {n: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                                               .map(i => i.alt || i.src.slice(0, 40)),
                        shown: imgs.map(i => ({alt: i.alt, natural: i.naturalWidth, css: i.clientWidth,
                                               attr: Number(i.getAttribute('width') || 0),
                                               label_px: Number(i.dataset.labelPx || 0)}))}; }"""
        )
        title = page.title()
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return PageCheck(console, errors, failed, info["n"], info["broken"], title, info["shown"])

"""IU-Phantom's contact sheet: finding names written out, captions wrapped to the tile, labels legible."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from medvl.data.phantom import prepare_phantom
from medvl.data.phantom.sheet import _COLOURS, CAPTION_PX, LABEL_PX, caption_lines, label_of

TILE = 256


def test_every_finding_label_is_whole_and_fits_a_tile():
    font = ImageFont.load_default(size=LABEL_PX)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for finding in _COLOURS:
        label = label_of(finding, "right")
        assert label.endswith(" R") and "_" not in label
        assert draw.textlength(label, font=font) <= TILE - 8, label
    assert label_of("consolidation", "left") == "consolidation L"  # was cut to 12 characters
    assert label_of("enlarged_cardiomediastinum", "") == "enl. cardiomediastinum"
    assert LABEL_PX >= 11 and CAPTION_PX >= 11


def test_captions_wrap_to_the_tile_without_losing_words():
    font = ImageFont.load_default(size=CAPTION_PX)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "PA: effusion L, effusion R, opacity L, opacity R, enl. cardiomediastinum, pleural other R"
    lines = caption_lines(text, TILE - 8)
    assert len(lines) >= 2 and " ".join(lines) == text
    assert all(draw.textlength(line, font=font) <= TILE - 8 for line in lines)
    assert caption_lines("PA: normal", TILE - 8) == ["PA: normal"]


def test_sheet_has_room_for_its_captions(tmp_path):
    result = prepare_phantom(tmp_path / "ph", studies=16, size=64, seed=0)
    sheet = Image.open(result.contact_sheet)
    assert sheet.width == 4 * TILE
    rows = sheet.height // (TILE + CAPTION_PX + 6)  # a tile and at least one caption line per row
    assert rows >= 1 and sheet.height % rows == 0 and TILE + CAPTION_PX + 6 <= sheet.height // rows < 2 * TILE

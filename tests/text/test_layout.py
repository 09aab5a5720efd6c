"""Sides and zones read from report text (medvl.text.layout)."""

from __future__ import annotations

from medvl.text.attributes import SEVERITY_ORDER
from medvl.text.labeler import extract_mentions
from medvl.text.layout import Device, Side, Zone, allowed_zone, device_of, merge_mentions, stated_layout
from medvl.text.phrases import Finding


def _layout(text: str) -> list[tuple[str, str, str | None]]:
    return stated_layout(extract_mentions(text))


def test_stated_layout_maps_zones_a_finding_cannot_have():
    assert _layout("Small left apical pleural effusion.") == [("effusion", "left", "base")]
    assert _layout("Right perihilar effusion. Left lower lobe opacity.") == [
        ("effusion", "right", "base"),
        ("opacity", "left", "lower"),
    ]
    assert _layout("Bilateral lower lobe atelectasis.") == [
        ("atelectasis", "left", "lower"),
        ("atelectasis", "right", "lower"),
    ]
    assert allowed_zone(Finding.FRACTURE, Zone.APEX) == Zone.UPPER
    assert allowed_zone(Finding.NODULE, Zone.PERIHILAR) == Zone.PERIHILAR  # no restriction


def test_devices_and_central_findings():
    assert _layout("Left chest wall port. ECG leads.") == [("device", "left", None)]
    assert _layout("The heart is enlarged. Pulmonary edema.") == []
    assert device_of("tube", "nasogastric tube") == Device.NG_TUBE
    assert device_of("tube", "endotracheal tube") == Device.ET_TUBE
    assert device_of("wire", "sternotomy wires") == Device.STERNAL_WIRES
    assert device_of(None, "xxxx") == Device.CENTRAL_LINE


def test_merged_entries_keep_the_largest_severity_and_plural_heads():
    (e,) = merge_mentions(extract_mentions("Small right effusion. Moderate right effusion."))
    assert (e.kind, e.side, e.severity) == (Finding.EFFUSION, Side.RIGHT, "moderate")
    (g,) = merge_mentions(extract_mentions("Calcified granulomas in the left upper lobe."))
    assert (g.kind, g.side, g.zone, g.count) == (Finding.GRANULOMA, Side.LEFT, Zone.UPPER, 2)
    (b,) = merge_mentions(extract_mentions("Blunting of the left costophrenic angle."))
    assert (b.kind, b.severity) == (Finding.EFFUSION, "trace")
    assert SEVERITY_ORDER == ("trace", "small", "mild", "moderate", "large", "severe")

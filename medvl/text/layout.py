"""Where a report puts its findings: the patient side and lung zone it states, read from the labeler's mentions.

The same reading serves the IU-Phantom (which draws each positive finding where its report says,
:func:`medvl.data.phantom.plan_findings`), the diffusion head's layout conditioning and the laterality
evaluation (which only count the sides a report itself gives, :func:`stated_layout` / :func:`stated_sides`).

Vocabulary: :class:`~medvl.text.phrases.Finding` (what a mention names), :class:`Side` (the patient's side),
:class:`Zone` (where in the lung), :class:`Device` (which support device a device mention names). Findings of
:data:`CENTRAL_KINDS` and the devices not in :data:`SIDED_DEVICES` have no side; a zone a finding cannot have is
mapped through :data:`ZONE_FALLBACK` (:func:`allowed_zone`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from medvl.text.attributes import SEVERITY_ORDER
from medvl.text.chexpert import POSITIVE
from medvl.text.labeler import Mention
from medvl.text.phrases import Finding

__all__ = [
    "Side",
    "Zone",
    "Device",
    "SIDED_DEVICES",
    "CENTRAL_KINDS",
    "ALLOWED_ZONES",
    "ZONE_FALLBACK",
    "DEFAULT_ZONES",
    "LayoutEntry",
    "device_of",
    "allowed_zone",
    "is_sided",
    "merge_mentions",
    "stated_layout",
    "stated_sides",
]


class Side(str, Enum):
    """The patient's side (``LEFT`` is drawn on the image's right)."""

    LEFT = "left"
    RIGHT = "right"


class Zone(str, Enum):
    APEX = "apex"
    UPPER = "upper"
    MID = "mid"
    LOWER = "lower"
    BASE = "base"
    PERIHILAR = "perihilar"
    RETROCARDIAC = "retrocardiac"


class Device(str, Enum):
    """Which support device a mention names (the labeler's coarse device kind plus the phrase decide which)."""

    PACEMAKER = "pacemaker"
    STERNAL_WIRES = "sternal_wires"
    CLIPS = "clips"
    ET_TUBE = "et_tube"
    NG_TUBE = "ng_tube"
    CHEST_TUBE = "chest_tube"
    CENTRAL_LINE = "central_line"
    PORT = "port"
    STENT = "stent"
    VALVE = "valve"
    SPINAL_HARDWARE = "spinal_hardware"
    SHOULDER_PROSTHESIS = "shoulder_prosthesis"
    ECG_LEADS = "ecg_leads"
    LOOP_RECORDER = "loop_recorder"


#: Devices that lie on one side of the chest (their region row records the side); the others are central.
SIDED_DEVICES = frozenset(
    {
        Device.PACEMAKER,
        Device.CENTRAL_LINE,
        Device.PORT,
        Device.CHEST_TUBE,
        Device.CLIPS,
        Device.SHOULDER_PROSTHESIS,
    }
)

#: Findings without a side (one organ, or both lungs at once).
CENTRAL_KINDS = frozenset({Finding.CARDIOMEGALY, Finding.ENLARGED_CARDIOMEDIASTINUM, Finding.EDEMA})
#: Zones each one-sided finding can have, and where a report's other zone goes instead.
ALLOWED_ZONES: dict[Finding, frozenset[Zone]] = {
    Finding.EFFUSION: frozenset({Zone.BASE, Zone.LOWER}),
    Finding.PNEUMOTHORAX: frozenset({Zone.APEX, Zone.UPPER, Zone.MID, Zone.LOWER, Zone.BASE}),
    Finding.FRACTURE: frozenset({Zone.UPPER, Zone.MID, Zone.LOWER}),
    Finding.PLEURAL_OTHER: frozenset({Zone.APEX, Zone.UPPER, Zone.MID, Zone.LOWER, Zone.BASE}),
}
ZONE_FALLBACK: dict[Zone, Zone] = {
    Zone.APEX: Zone.UPPER,
    Zone.BASE: Zone.LOWER,
    Zone.PERIHILAR: Zone.MID,
    Zone.RETROCARDIAC: Zone.LOWER,
}
#: The usual zones of each one-sided finding (the first is the fallback of :func:`allowed_zone`; the phantom draws
#: one of them at random where a report gives no zone).
DEFAULT_ZONES: dict[Finding, tuple[Zone, ...]] = {
    Finding.EFFUSION: (Zone.BASE,),
    Finding.PNEUMOTHORAX: (Zone.APEX,),
    Finding.ATELECTASIS: (Zone.LOWER, Zone.BASE),
    Finding.CONSOLIDATION: (Zone.LOWER, Zone.LOWER, Zone.MID, Zone.UPPER),
    Finding.PNEUMONIA: (Zone.LOWER, Zone.LOWER, Zone.MID, Zone.UPPER),
    Finding.OPACITY: (Zone.LOWER, Zone.MID, Zone.UPPER),
    Finding.NODULE: (Zone.UPPER, Zone.MID, Zone.LOWER),
    Finding.MASS: (Zone.UPPER, Zone.MID, Zone.LOWER),
    Finding.GRANULOMA: (Zone.UPPER, Zone.MID, Zone.LOWER),
    Finding.FRACTURE: (Zone.UPPER, Zone.MID, Zone.LOWER),
    Finding.PLEURAL_OTHER: (Zone.APEX, Zone.APEX, Zone.MID),
}
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITY_ORDER)}


def device_of(device: str | None, phrase: str) -> Device:
    """Which device a mention names, from the labeler's coarse ``device`` kind and the mention's phrase."""
    p = phrase.lower()
    if device == "pacemaker":
        return Device.PACEMAKER
    if device in ("tube", "drain"):
        if device == "drain" or re.search(r"chest|thoracostomy|pigtail|pleural", p):
            return Device.CHEST_TUBE
        if re.search(
            r"naso|\bng\b|\bog\b|orogastric|feeding|enteric|gastric|dobb?hoff|gastrostomy|jejunostomy|"
            r"\bg\b|\bj\b",
            p,
        ):
            return Device.NG_TUBE
        return Device.ET_TUBE
    if device in ("line", "catheter"):
        return Device.CENTRAL_LINE
    if device == "port":
        return Device.PORT
    if device in ("clip", "coil", "filter"):
        return Device.CLIPS
    if device == "wire":
        return (
            Device.ECG_LEADS if re.search(r"ecg|ekg|telemetry|monitor|electrode", p) else Device.STERNAL_WIRES
        )
    if device == "stent":
        return Device.STENT
    if device == "valve":
        return Device.VALVE
    if device == "hardware":
        return Device.SPINAL_HARDWARE
    if device == "prosthesis":
        return Device.SHOULDER_PROSTHESIS
    if device == "device":
        return Device.LOOP_RECORDER if re.search(r"monitor|recorder", p) else Device.PACEMAKER
    return Device.CENTRAL_LINE


def is_sided(kind: Finding, device: Device | None) -> bool:
    """Whether a finding lies on one side: not a central finding, not a central device."""
    return kind not in CENTRAL_KINDS and (kind != Finding.DEVICE or device in SIDED_DEVICES)


def allowed_zone(kind: Finding, zone: Zone) -> Zone:
    """A stated zone the finding can have, or where a zone it cannot have goes instead."""
    allowed = ALLOWED_ZONES.get(kind)
    if allowed is not None and zone not in allowed:
        fallback = ZONE_FALLBACK.get(zone, DEFAULT_ZONES[kind][0])
        return fallback if fallback in allowed else DEFAULT_ZONES[kind][0]
    return zone


@dataclass
class LayoutEntry:
    """One positive finding of a report after merging its mentions: ``side``/``zone`` as the report states them
    (None where it is silent), the largest stated ``severity``, the ``finding``/``observation``/``word`` of its
    first mention, and ``count`` 2 for a plural lesion head ("nodules")."""

    kind: Finding
    device: Device | None
    side: Side | None
    zone: Zone | None
    severity: str | None
    finding: str
    observation: str
    word: str
    count: int = 1


def merge_mentions(mentions: Sequence[Mention]) -> list[LayoutEntry]:
    """Positive mentions merged per finding, side and zone, in report order.

    Mentions of the same finding merge when their sides and zones agree or one of them is unstated ("small left
    effusion ... the effusion"); ``bilateral`` gives one entry per side; a retrocardiac finding is on the patient's
    left; "blunting" of the costophrenic angle is a trace effusion.
    """
    entries: list[LayoutEntry] = []
    positive = [m for m in mentions if m.value == POSITIVE and m.finding is not None]
    # Sided mentions first, so that an unsided mention of the same finding joins one of them.
    positive.sort(key=lambda m: (m.side is None, m.start))
    for m in positive:
        kind = m.finding
        dev = device_of(m.device, m.phrase) if kind == Finding.DEVICE else None
        zone = Zone(m.zone) if m.zone else None
        sided = is_sided(kind, dev)
        if not sided:
            sides: list[Side | None] = [None]
            zone = None
        elif m.side == "bilateral":
            sides = [Side.LEFT, Side.RIGHT]
        else:
            sides = [Side(m.side) if m.side else None]
        if zone == Zone.RETROCARDIAC and sided:
            sides = [Side.LEFT]
        head = (m.head or "").strip()
        severity = m.severity
        if kind == Finding.EFFUSION and severity is None and head.startswith("blunt"):
            severity = "trace"  # blunting of the costophrenic angle
        plural = kind in (Finding.NODULE, Finding.GRANULOMA, Finding.MASS) and (
            head.endswith("s") or head == "granulomatous"
        )
        for side in sides:
            match = next(
                (
                    e
                    for e in entries
                    if e.kind == kind
                    and e.device == dev
                    and (side is None or e.side is None or e.side == side)
                    and (zone is None or e.zone is None or e.zone == zone)
                ),
                None,
            )
            if match is None:
                entries.append(
                    LayoutEntry(
                        kind,
                        dev,
                        side,
                        zone,
                        severity,
                        m.finding.value,
                        m.observation,
                        head,
                        2 if plural else 1,
                    )
                )
                continue
            match.side = match.side or side
            match.zone = match.zone or zone
            if severity and (
                match.severity is None or _SEVERITY_RANK[severity] > _SEVERITY_RANK[match.severity]
            ):
                match.severity = severity
            match.word = match.word or head
            match.count = max(match.count, 2 if plural else 1)
    entries.sort(key=lambda e: min(m.start for m in positive if m.finding == e.kind))
    return entries


def stated_layout(mentions: Sequence[Mention]) -> list[tuple[str, str, str | None]]:
    """``(finding, patient side, zone or None)`` for each one-sided finding whose side the report gives, merged
    as :func:`merge_mentions` merges them; the zone where the report gives one (a zone a finding cannot have is
    mapped by :func:`allowed_zone`)."""
    out = []
    for e in merge_mentions(mentions):
        if e.side is None or not is_sided(e.kind, e.device):
            continue
        zone = allowed_zone(e.kind, e.zone).value if e.zone is not None else None
        out.append((e.finding or e.kind.value, e.side.value, zone))
    return out


def stated_sides(mentions: Sequence[Mention]) -> set[tuple[str, str]]:
    """``{(finding, patient side)}`` for the one-sided findings whose side the report itself gives ("left
    effusion", "bilateral ..." on both sides, a retrocardiac finding on the left). A finding the report leaves
    without a side (which the phantom draws on a random side, or a device's usual side) is not in it."""
    return {(finding, side) for finding, side, _ in stated_layout(mentions)}

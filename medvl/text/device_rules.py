"""Support Devices phrase rules of the report labeler (each sets the mention's device kind, one of
:data:`~medvl.text.phrases.DEVICE_KINDS`); :mod:`medvl.text.phrase_rules` appends them to ``PHRASE_RULES``.
"""

from __future__ import annotations

from medvl.text.phrases import Finding, PhraseRule, PhraseTable

__all__ = ["DEVICE_RULES"]

_TABLE = PhraseTable()
_add = _TABLE.add

# Support Devices
_SD = "Support Devices"
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:(?:dual|single|biventricular|left|right|chest|cardiac|permanent|transvenous)[-\s]+(?:chamber\s+|lead\s+|sided\s+|wall\s+)?)?"
    r"(?P<head>pacemakers?|pacers?|defibrillators?|aicds?|icds?|cardioverter[-\s]defibrillators?|pacemaker/defibrillator|pacer/defibrillator)(?:\s+(?:leads?|wires?|generators?|devices?|battery))?\b",
    device="pacemaker",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:pacer|pacemaker|pacing|transvenous|epicardial|icd|aicd|defibrillator|ventricular|atrial|cardiac)\s+(?P<head>leads?|wires?|generators?)\b",
    device="pacemaker",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:endotracheal|et|nasogastric|ng|og|orogastric|feeding|chest|thoracostomy|tracheostomy|tracheotomy|enteric|gastric|dobhoff|dobbhoff|gastrostomy|jejunostomy|nasoenteric|g|j|pigtail)[-\s]+(?P<head>tubes?)\b",
    device="tube",
)
_add(_SD, Finding.DEVICE, r"\b(?P<head>ett|tracheostomy|trach|dobhoff|dobbhoff)\b", device="tube")
_add(_SD, Finding.DEVICE, r"\b(?:support|monitoring)\s+(?P<head>tubes?|lines?)\b", device="line")
_add(_SD, Finding.DEVICE, r"\b(?P<head>tubes)\s+and\s+lines\b", device="tube")
_add(_SD, Finding.DEVICE, r"\b(?P<head>lines)\s+and\s+tubes\b", device="line")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:picc|central|central\s+venous|venous|ij|internal\s+jugular|subclavian|swan[-\s]ganz|arterial|dialysis|hickman|hemodialysis|port|triple[-\s]lumen|double[-\s]lumen)\s+(?:\w+\s+)?(?P<head>lines?)\b",
    device="line",
)
_add(_SD, Finding.DEVICE, r"\b(?P<head>picc)\b", device="line")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:swan[-\s]ganz\s+|pulmonary\s+artery\s+|central\s+venous\s+|venous\s+|dialysis\s+|hemodialysis\s+|indwelling\s+|pigtail\s+)?(?P<head>catheters?)\b",
    device="catheter",
    before=r"\b(?:urinary|foley|bladder)\s+$",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>port[-\s]?a[-\s]?cath|portacath|mediport|powerport|infusaport)\b",
    device="port",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:chest|infusion|venous|subcutaneous|power|central\s+venous|chest\s+wall|right[-\s]sided|left[-\s]sided|right|left)\s+(?P<head>port)\b",
    device="port",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:surgical|vascular|cholecystectomy|metallic|metal|hemostatic|aneurysm)?\s*(?P<head>clips?|staples)\b",
    device="clip",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:median\s+)?(?:sternotomy|sternal|cerclage|surgical|metallic|suture)\s+(?P<head>wires?|sutures)\b",
    device="wire",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>wires?)\b",
    device="wire",
    before=r"\b(?:guide|pacer|pacemaker|pacing|transvenous|epicardial|icd|aicd|defibrillator|ventricular|atrial|cardiac)\s+$",
)
# A bare "sternotomy" is a procedure, not a device: NLM's indexers do not index it as one (its wires are).
_add(_SD, Finding.DEVICE, r"\b(?P<head>stents?)\b", device="stent")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:prosthetic|mechanical|artificial|bioprosthetic|replacement)\s+(?:\w+\s+)?(?P<head>valves?)\b",
    device="valve",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:aortic|mitral|tricuspid)\s+(?P<head>valve)\s+(?:replacement|prosthes[ie]s)\b",
    device="valve",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:orthopedic\s+|surgical\s+|fixation\s+|spinal\s+|fusion\s+|postsurgical\s+|metallic\s+|cervical\s+|thoracic\s+|lumbar\s+)*(?P<head>hardware)\b",
    device="hardware",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:fixation|orthopedic|surgical|metallic|compression|fusion|spinal|harrington)\s+(?:\w+\s+)?(?P<head>plates?|screws?|rods?)\b",
    device="hardware",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:chest\s+|pleural\s+|surgical\s+|mediastinal\s+|pigtail\s+)?(?P<head>drains?)\b",
    device="drain",
)
_add(_SD, Finding.DEVICE, r"\b(?:embolization\s+)?(?P<head>coils?)\b", device="coil")
_add(_SD, Finding.DEVICE, r"\b(?:ivc|vena\s+cava|caval)\s+(?P<head>filter)\b", device="filter")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>prosthes[ie]s|arthroplasty|arthroplasties|implants?)\b",
    device="prosthesis",
)
# IU X-ray redacts some words as "XXXX": "left chest XXXX with tip in the SVC" is a port or catheter.
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:chest|chest\s+wall|ij|subclavian|jugular)\s+(?P<head>xxxx)\s+(?:with\s+(?:its\s+|the\s+|a\s+)?|whose\s+)?(?:distal\s+)?tip\b",
    device="catheter",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:cardiac|pacer|pacemaker|pulse|xxxx)\s+(?P<head>generator)\b",
    device="pacemaker",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:left|right)(?:-sided)?\s+(?:sided\s+)?chest\s+(?:wall\s+)?(?P<head>xxxx)\b(?!\s+(?:are|is\s+within|representing))",
    device="catheter",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\bcardiac\s+(?P<head>xxxx)\s+(?:generator|in\s+stable|and\s+leads|with\s+leads|project\w*|is\s+intact|are\s+visualized|device)\b",
    device="pacemaker",
)
_add(_SD, Finding.DEVICE, r"\b(?P<head>xxxx)-a-xxxx\b", device="port")
_add(_SD, Finding.DEVICE, r"\b(?P<head>portacatheter|port-a-catheter)\b", device="port")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:closure|occluder|occlusion)\s+(?P<head>device)\b|\b(?:septal\s+)?(?P<head2>occluder)\b",
    device="device",
)
_add(_SD, Finding.DEVICE, r"\b(?:cabg|bypass|graft|surgical)\s+(?P<head>markers?)\b", device="clip")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>leads?)\s+(?:\w+\s+){0,3}(?:the\s+)?(?:right|left)\s+(?:atri|ventric)\w*",
    device="pacemaker",
)
_add(_SD, Finding.DEVICE, r"\b(?:\w+\s+)?(?P<head>stimulator)\b", device="device")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:vp|ventriculoperitoneal|ventriculoatrial|shunt)\s+(?P<head>shunt|tubing|catheter)\b",
    device="tube",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:cardiac\s+|heart\s+)?(?P<head>valve)\s+(?:replacement|prosthes[ie]s)\b",
    device="valve",
)
_add(_SD, Finding.DEVICE, r"\b(?:internal\s+)?(?P<head>fixation)\b", device="hardware")
_add(_SD, Finding.DEVICE, r"\b(?:bone|suture)\s+(?P<head>anchors?)\b", device="hardware")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:surgical\s+|radiopaque\s+)?(?P<head>sutures?)(?:\s+(?:material|line))?\b",
    device="suture",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:ecg|ekg|telemetry|monitoring|monitor|cardiac\s+monitoring)\s+(?P<head>leads?|electrodes?|wires?)\b",
    device="wire",
)
_add(_SD, Finding.DEVICE, r"\b(?:loop\s+|cardiac\s+|event\s+)(?P<head>recorder|monitor)\b", device="device")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:medical|support|cardiac|implanted|implantable|monitoring|electronic|surgical|metallic)\s+(?P<head>devices?)\b",
    device="device",
)

DEVICE_RULES: tuple[PhraseRule, ...] = tuple(_TABLE.rules)

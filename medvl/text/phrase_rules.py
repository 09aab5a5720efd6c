"""Phrase rules of the report labeler: phrases that name one of CheXpert's observations by themselves.

``PHRASE_RULES`` is the labeler's table, in the order the labeler tries it: the findings' phrases below, then the
Support Devices phrases of :mod:`medvl.text.device_rules`. Subjects read through their predicate ("heart size is
normal") are in :mod:`medvl.text.subject_rules`.
"""

from __future__ import annotations

from medvl.text.chexpert import NEGATIVE
from medvl.text.device_rules import DEVICE_RULES
from medvl.text.phrases import Finding, PhraseRule, PhraseTable

__all__ = ["PHRASE_RULES"]

# --- shared word classes --------------------------------------------------------------------------------------
_SIDE = r"(?:(?:right|left|bilateral|lateral|posterior|both|the)\s+)*"

_TABLE = PhraseTable()
_add = _TABLE.add

# Cardiomegaly and Enlarged Cardiomediastinum (besides the subject rules)
_add("Cardiomegaly", Finding.CARDIOMEGALY, r"\b(?P<head>cardiomegaly)\b")
_add(
    "Cardiomegaly",
    Finding.CARDIOMEGALY,
    r"\b(?:cardiac|heart)\s+(?:silhouette\s+|shadow\s+|size\s+)?(?P<head>enlargement)\b",
)
_add(
    "Cardiomegaly",
    Finding.CARDIOMEGALY,
    r"\b(?P<head>enlargement|prominence)\s+of\s+the\s+(?:(?:right|left)\s+)?(?:heart|cardiac\s+(?:silhouette|shadow|size|contours?))\b",
)
# "interval increase in heart size" (but "no increase in heart size" says nothing about cardiomegaly)
_add(
    "Cardiomegaly",
    Finding.CARDIOMEGALY,
    r"\b(?P<head>increase)\s+in\s+(?:the\s+)?(?:heart\s+size|size\s+of\s+the\s+(?:heart|cardiac\s+silhouette)|cardiac\s+(?:size|silhouette))\b",
    before=r"\bno\s+(?:\w+\s+){0,2}$",
)
_add(
    "Enlarged Cardiomediastinum",
    Finding.ENLARGED_CARDIOMEDIASTINUM,
    r"\b(?:cardio[-\s]?mediastinal|mediastinal)\s+(?:silhouette\s+|contours?\s+)?(?P<head>widening|enlargement)\b",
)
_add(
    "Enlarged Cardiomediastinum",
    Finding.ENLARGED_CARDIOMEDIASTINUM,
    r"\b(?P<head>widening|enlargement|prominence|fullness)\s+of\s+the\s+(?:(?:superior|upper)\s+)?(?:cardio)?mediastin(?:um|al\s+(?:silhouette|contours?|shadow))\b",
)

# Pleural Effusion
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?:pleural\s+)?(?P<head>effusions?)\b",
    before=r"\b(?:pericardial|joint|knee|shoulder|elbow|subpulmonic\s+pericardial)[\s-]+(?:\w+\s+)?$",
)
_add("Pleural Effusion", Finding.EFFUSION, r"\bpleural\s+(?P<head>fluid)\b")
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>fluid)\s+(?:with)?in\s+the\s+"
    + _SIDE
    + r"(?:pleural\s+spaces?|(?:minor|major|horizontal|oblique)\s+fissures?)",
)
_add("Pleural Effusion", Finding.EFFUSION, r"\b(?P<head>hydrothorax|hydropneumothorax|hemothorax|empyema)\b")
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>blunting|obliteration)\s+of\s+(?:both\s+|the\s+)?"
    + _SIDE
    + r"(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>blunt(?:ed|ing))\s+(?:of\s+)?"
    + _SIDE
    + r"(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>blunting|blunted)\s+(?:of\s+)?(?:both\s+|the\s+)?"
    + _SIDE
    + r"(?:(?:lateral|posterior|anterior)\s+(?:and\s+\w+\s+)?)?(?:sulcus|sulci)\b",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?:costophrenic|cp)\s+(?:(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)\s+)?(?:(?:is|are|appears?|remains?)\s+)?"
    r"(?:(?:mildly|minimally|slightly|again|still|now|persistently)\s+)?(?P<head>blunting|blunted)\b",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?:(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)\s+(?:are|is|appear|appears|remain)\s+(?:\w+\s+)?(?:sharp|sharply\s+defined|clear|preserved|well[-\s]defined)"
    r"|(?:sharp|clear|preserved)\s+(?:\w+\s+)?(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx))\b",
    value=NEGATIVE,
)

# Pneumothorax
_add("Pneumothorax", Finding.PNEUMOTHORAX, r"\b(?P<head>(?:hydro)?pneumothora(?:x|ces|xes|xs))\b")
_add("Pneumothorax", Finding.PNEUMOTHORAX, r"\bpleural\s+(?P<head>air)\b(?:\s+collections?)?")

# Consolidation
_add("Consolidation", Finding.CONSOLIDATION, r"\b(?P<head>consolidat(?:ion|ions|ive|ed|ing))\b")

# Pneumonia
_add("Pneumonia", Finding.PNEUMONIA, r"\b(?P<head>(?:broncho)?pneumonias?|pneumonitis)\b")
_add(
    "Pneumonia",
    Finding.PNEUMONIA,
    r"\b(?P<head>infections?)\b",
    before=r"\b(?:granulomatous|prior|old|remote|previous|healed|past|tb|tuberculous|fungal|histoplasm\w*|viral|urinary|skin)\s+(?:\w+\s+)?$",
)
_add(
    "Pneumonia",
    Finding.PNEUMONIA,
    r"\b(?P<head>infectious)\s+(?:\w+\s+)?(?:process|etiology|cause|infiltrates?|disease|pneumonitis|consolidation)\b",
)

# Atelectasis
_add("Atelectasis", Finding.ATELECTASIS, r"\b(?P<head>atelecta(?:sis|ses|tic|sia))\b")
_add(
    "Atelectasis", Finding.ATELECTASIS, r"\b(?:lobar|lobe|lung|segmental|subsegmental)\s+(?P<head>collapse)\b"
)
_add(
    "Atelectasis",
    Finding.ATELECTASIS,
    r"\b(?P<head>collapse)\s+of\s+the\s+(?:\w+\s+){0,3}(?:lobes?|lungs?|lingula|segments?)\b",
)
_add(
    "Atelectasis", Finding.ATELECTASIS, r"\b(?P<head>collapsed)\s+(?:\w+\s+){0,2}(?:lobes?|lungs?|lingula)\b"
)

# Edema
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?P<head>edema|oedema|edematous)\b",
    before=r"\b(?:soft[-\s]tissue|subcutaneous|extremity|facial|chest\s+wall|mucosal|leg|pedal|scalp|airway)\s+(?:\w+\s+)?$",
)
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?:(?:pulmonary|vascular|venous|interstitial|central|hilar|perihilar|mild|moderate)\s+)*(?P<head>congestion)\b",
    before=r"\b(?:nasal|sinus|hepatic|liver|splenic)\s+$",
)
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?:pulmonary\s+|central\s+|hilar\s+)*vascular\s+(?P<head>prominence|engorgement|redistribution|indistinctness|plethora)\b",
)
_add("Edema", Finding.EDEMA, r"\bpulmonary\s+venous\s+(?P<head>hypertension|engorgement)\b")
_add(
    "Edema",
    Finding.EDEMA,
    r"\bpulmonary\s+xxxx\s+(?:are|is|appear|appears)\s+(?:\w+ly\s+)?(?P<head>engorged)\b",
)
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?P<head>indistinct)\s+(?:pulmonary\s+|central\s+|hilar\s+)?vascula\w+(?:\s+margin\w*)?",
)
_add("Edema", Finding.EDEMA, r"\b(?P<head>congestive)\s+(?:heart\s+)?failure\b")
_add("Edema", Finding.EDEMA, r"\b(?P<head>chf)\b")
_add("Edema", Finding.EDEMA, r"\bheart\s+(?P<head>failure)\b")
_add("Edema", Finding.EDEMA, r"\b(?P<head>cephalization)\b")
_add("Edema", Finding.EDEMA, r"\b(?P<head>kerley)\b")
_add("Edema", Finding.EDEMA, r"\bfluid\s+(?P<head>overload)\b")

# Lung Opacity
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>opaci(?:ty|ties|fication|fications|fied))\b",
    before=r"\b(?:nodular|nodule[-\s]like|round|rounded|mass[-\s]like|pleural[-\s]based|pleuroparenchymal|pleural[-\s]parenchymal)[\s-]+(?:\w+\s+)?$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>infiltrat(?:e|es|ion|ions|ive))\b",
    before=r"\bnodular[\s-]+$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>airspace|air-space)\s+(?:disease|process|opacit\w*|densit\w*|filling)\b",
)
_add(
    "Lung Opacity", Finding.OPACITY, r"\bair\s+space\s+(?P<head>disease|process|opacity|opacities|filling)\b"
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?:increased|hazy|patchy|streaky|linear|ill-defined|ground[-\s]glass|airspace|interstitial|reticular|parenchymal|focal)\s+(?:\w+\s+)?(?P<head>densit(?:y|ies))\b",
    before=r"\b(?:nodular|round|rounded|calcified|bone|breast|soft\s+tissue)\s+$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>densit(?:y|ies))\s+(?:\w+\s+){0,2}(?:in|at|within|of|involving|projecting\s+over|overlying)\s+the\s+(?:\w+\s+){0,3}(?:lobes?|lungs?|bases?|base|apex|apices|lingula|hemithorax|zones?|fields?|hilum|hila|retrocardiac|region)\b",
    before=r"\b(?:nodular|round|rounded|calcified|bone|breast|soft\s+tissue|mineral|granulomatous)\s+(?:\w+\s+)?$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?:(?:retrocardiac|basilar|bibasilar|perihilar|lingular|apical)\s+)(?P<head>densit(?:y|ies))\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\binterstitial\s+(?P<head>pattern|prominence|thickening|disease|lung\s+disease|changes?|process|abnormalit(?:y|ies)|fibrosis|infiltrates?)\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>reticulonodular|reticular)\s+(?:pattern|changes?|markings?|opacit\w*|densit\w*|prominence)\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>reticulation|haziness|fibrosis|fibrotic)\b",
    before=r"\b(?:pleural|cystic)[\s-]+$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?:peribronchial|bronchial\s+wall|airway\s+wall|bronchovascular)\s+(?P<head>thickening|cuffing)\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>scar(?:s|ring|red)?)\b",
    before=r"\b(?:pleural|pleuroparenchymal|pleural[-\s]parenchymal|pleural\s+parenchymal|pleural\s+based|skin|surgical|sternotomy|chest\s+wall|soft\s+tissue)[\s-]+(?:\w+\s+)?$",
)

# Lung Lesion
_add(
    "Lung Lesion",
    Finding.NODULE,
    r"\b(?P<head>nodules?|nodularity|micronodules?)\b",
    before=r"\b(?:thyroid|breast|lymph|nipple|skin|soft\s+tissue|liver|hepatic|renal|adrenal)[\s-]+(?:\w+\s+)?$",
)
_add(
    "Lung Lesion",
    Finding.NODULE,
    r"\bnodular\s+(?P<head>opacit\w*|densit\w*|lesions?|infiltrates?|foci|focus|shadows?)\b",
)
_add("Lung Lesion", Finding.NODULE, r"\b(?:round|rounded)\s+(?P<head>opacit(?:y|ies)|densit(?:y|ies))\b")
_add(
    "Lung Lesion",
    Finding.NODULE,
    r"\b(?P<head>lesions?)\b",
    before=r"\b(?:lytic|sclerotic|blastic|bone|bony|osseous|skin|cutaneous|osteolytic|expansile|rib|spine|spinal|vertebral|liver|hepatic)[\s-]+(?:\w+\s+)?$",
)
_add(
    "Lung Lesion",
    Finding.MASS,
    r"\b(?P<head>mass(?:es)?)\b",
    before=r"\b(?:soft\s+tissue|muscle|bone|breast|body|chest\s+wall|thyroid|abdominal|neck)[\s-]+(?:\w+\s+)?$",
    after=r"[\s-]+effect",
)
_add(
    "Lung Lesion",
    Finding.MASS,
    r"\b(?P<head>tumou?rs?|neoplasms?|neoplastic|carcinoma|malignancy|cancer|metastas[ie]s|metastatic)\b",
    before=r"\b(?:breast|prostate|colon|renal|thyroid|bladder|skin|ovarian|cervical|uterine)\s+$",
)
_add("Lung Lesion", Finding.MASS, r"\bcavitary\s+(?P<head>lesions?|masse?s?|nodules?)\b")
_add("Lung Lesion", Finding.GRANULOMA, r"\b(?P<head>granulomas?|granulomata)\b")
_add(
    "Lung Lesion",
    Finding.GRANULOMA,
    r"\b(?P<head>granulomatous)\s+(?:\w+\s+)?(?:disease|changes?|process|sequela\w*|infection|exposure|scarring|calcifications?|nodes?|foci|focus|lesions?|pattern)\b",
)

# Pleural Other
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\bpleural\s+(?P<head>thickening|plaques?|calcifications?|scarring|scars?|fibrosis|reaction|calcified\s+plaques?)\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?:pleuroparenchymal|pleural[-\s]parenchymal|pleural[-\s]+based|parenchymal[-\s]pleural)\s+(?P<head>scarring|scars?|thickening|opacit(?:y|ies)|densit(?:y|ies)|changes?|fibrosis)\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?P<head>thickening)\s+of\s+the\s+" + _SIDE + r"(?:apical\s+)?pleura\b",
)
_add("Pleural Other", Finding.PLEURAL_OTHER, r"\b(?P<head>fibrothorax|pleurodesis)\b")
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?:interlobar\s+)?(?:fissural|fissure)\s+(?P<head>thickening)\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?P<head>thickening)\s+(?:in|of)\s+the\s+(?:\w+\s+){0,2}fissures?\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\bpleural[-\s]\w+\s+(?P<head>scarring|scars?|thickening)\b",
    before=r"\b(?:no|without)\s+$",
)
_add("Pleural Other", Finding.PLEURAL_OTHER, r"\bapical\s+(?:pleural\s+)?(?P<head>cap(?:s|ping)?)\b")
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?:calcified\s+)?(?P<head>plaques?)\b",
    before=r"\b(?:atherosclerotic|aortic|vascular|arterial|pleural|calcified\s+pleural)[\s-]+(?:\w+\s+)?$",
)

# Fracture
_add("Fracture", Finding.FRACTURE, r"\b(?P<head>fractures?|fractured|fx|fxs)\b")

PHRASE_RULES: tuple[PhraseRule, ...] = tuple(_TABLE.rules) + DEVICE_RULES

"""CheXpert's 14 observations: names, orders and value conventions shared by the package."""

from __future__ import annotations

#: CheXpert's own order (the order of its labeler's output and of ``medvl label``).
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: Column of "No Finding" in ``CHEXPERT_LABELS`` order (a normal report).
NO_FINDING: int = CHEXPERT_LABELS.index("No Finding")

#: CheXbert's 5-observation convention used for ``ce.micro5``.
CHEXPERT_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
# Blank (not mentioned) is NaN in arrays and an empty string in CSV files.

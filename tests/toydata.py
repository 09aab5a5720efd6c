"""A tiny prepared dataset for unit tests of the models (no phantom build needed).

Images (S x S) hold a dark two-lobed chest silhouette and, for abnormal reports, one bright
blob on the stated side; reports come from a few templates; labels follow the templates;
``regions.csv`` holds the blob boxes. It is for shapes and plumbing, not for quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from medvl.data.prepared import (
    CACHE_FILE,
    FORMAT,
    INDEX_FILE,
    META_FILE,
    REGIONS_FILE,
    SKIPPED_FILE,
    to_uint8,
)
from medvl.text.chexpert import CHEXPERT_LABELS

TEMPLATES = [
    ("The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.", None, None),
    ("Small left pleural effusion. Heart size is normal.", "Pleural Effusion", "left"),
    ("Right lower lobe opacity concerning for pneumonia.", "Lung Opacity", "right"),
    ("Cardiomegaly. No focal consolidation.", "Cardiomegaly", "center"),
    ("Small right pleural effusion. No pneumothorax.", "Pleural Effusion", "right"),
    ("Left upper lobe nodule. Lungs otherwise clear.", "Lung Lesion", "left"),
]
WORDS = {
    "Pleural Effusion": ("effusion", "effusion"),
    "Lung Opacity": ("opacity", "opacity"),
    "Cardiomegaly": ("cardiomegaly", "cardiomegaly"),
    "Lung Lesion": ("nodule", "nodule"),
}


def make_tiny_prepared(root: str | Path, n: int = 48, size: int = 64, seed: int = 0) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.zeros((n, size, size), np.uint8)
    rows, regions = [], []
    for i in range(n):
        report, obs, side = TEMPLATES[i % len(TEMPLATES)]
        img = np.full((size, size), 600.0)
        for cx in (0.3, 0.7):  # lungs dark
            img -= 900.0 * (((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1)
        img += rng.normal(0, 40, img.shape)
        labels = {c: np.nan for c in CHEXPERT_LABELS}
        if obs is None:
            labels["No Finding"] = 1.0
        else:
            labels[obs] = 1.0
            # patient's left is the image's right
            cx = {"left": 0.7, "right": 0.3, "center": 0.5}[side] + rng.uniform(-0.04, 0.04)
            cy = 0.6 + rng.uniform(-0.05, 0.05)
            r = 0.12
            img += 1200.0 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2)
            regions.append(
                {
                    "dicom_id": f"d{i:04d}",
                    "finding": WORDS[obs][1],
                    "side": side,
                    "zone": "lower",
                    "x0": cx - r,
                    "y0": cy - r,
                    "x1": cx + r,
                    "y1": cy + r,
                    "observation": obs,
                    "word": WORDS[obs][0],
                }
            )
        images[i] = to_uint8(np.clip(img, -1024, 1024))
        split = "train" if i < int(n * 0.7) else ("validate" if i < int(n * 0.8) else "test")
        rows.append(
            {
                "row": i,
                "dicom_id": f"d{i:04d}",
                "subject_id": f"1{i:07d}",
                "study_id": f"5{i:07d}",
                "split": split,
                "view": "PA",
                "source": f"toy/{i}.jpg",
                "findings": report,
                "impression": "",
                "report": report,
                **labels,
            }
        )
    np.save(root / CACHE_FILE, images)
    pd.DataFrame(rows).to_csv(root / INDEX_FILE, index=False)
    pd.DataFrame(columns=["path", "reason"]).to_csv(root / SKIPPED_FILE, index=False)
    pd.DataFrame(regions).to_csv(root / REGIONS_FILE, index=False)
    (root / META_FILE).write_text(json.dumps({"format": FORMAT, "size": size, "source": "toy"}))
    return root

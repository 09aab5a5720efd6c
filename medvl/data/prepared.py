"""The prepared dataset: what ``medvl prepare`` writes and every training stage reads.

Layout of a prepared directory ``DIR``::

    DIR/meta.json     {"format": "medvl-prepared/1", "size": S, "source": ..., "sections": ..., ...}
                      written last: a directory without it is unfinished (rerun the same command to resume)
    DIR/index.csv     one row per usable image (columns INDEX_COLUMNS); ``row`` is its row in the image cache,
                      ``source`` the image file relative to the raw root, ``report`` the text for ``sections``
    DIR/skipped.csv   path,reason for every input that could not be used
    DIR/images.npy    uint8 array (N, S, S), opened as a memory map: reading an image is a copy,
                      never a decode (see benchmarks/prepare_throughput.py). Rows of images that failed to
                      decode stay zero and no index row points at them.
    DIR/regions.csv   (IU-Phantom only) dicom_id,finding,side,zone,x0,y0,x1,y1, boxes in normalised coordinates
                      of the *prepared* (padded, square) image
    DIR/.prepare/     resume state: settings and one done-marker per finished chunk of images

Images are resized once, keeping their aspect ratio by padding to a square with air (see
:func:`medvl.data.images.resize_xray`). Intensities follow torchxrayvision's convention: float32 in [-1024, 1024],
lungs dark. The cache stores them as ``round((x + 1024) / 2048 * 255)``. This module is the read side;
:mod:`medvl.data.ingest` writes it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS

FORMAT = "medvl-prepared/1"
INDEX_FILE = "index.csv"
SKIPPED_FILE = "skipped.csv"
CACHE_FILE = "images.npy"
META_FILE = "meta.json"
REGIONS_FILE = "regions.csv"
STATE_DIR = ".prepare"
REGION_BOX_COLUMNS = ("x0", "y0", "x1", "y1")
SPLITS = ("train", "validate", "test")
INDEX_COLUMNS = (
    "row",
    "dicom_id",
    "subject_id",
    "study_id",
    "split",
    "view",
    "source",
    "findings",
    "impression",
    "report",
    *CHEXPERT_LABELS,
)
#: The text columns of the index (read back as strings, never NaN).
TEXT_COLUMNS = INDEX_COLUMNS[1:10]
#: The table an ingestion builds before the image cache: the index's columns (less ``row``) and the source path.
CANDIDATE_COLUMNS = (*INDEX_COLUMNS[1:], "path")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1024, 1024] float -> uint8 cache value."""
    x = (np.asarray(image, dtype=np.float32) + 1024.0) * (255.0 / 2048.0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def from_uint8(cached: np.ndarray) -> np.ndarray:
    """uint8 cache value -> float32 in [-1024, 1024]."""
    return cached.astype(np.float32) * (2048.0 / 255.0) - 1024.0


@dataclass
class PreparedInfo:
    root: Path
    size: int
    source: str
    meta: dict


def read_meta(root: str | Path) -> PreparedInfo:
    root = Path(root)
    meta_path = root / META_FILE
    if not meta_path.exists():
        raise DataError(f"{root} is not a prepared dataset (no {META_FILE}); run `medvl prepare ...` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return PreparedInfo(root=root, size=int(meta["size"]), source=str(meta.get("source", "")), meta=meta)


def read_index(root: str | Path) -> pd.DataFrame:
    """The index table with text columns as strings (never NaN) and labels as floats (NaN = blank)."""
    root = Path(root)
    path = root / INDEX_FILE
    if not path.exists():
        raise DataError(f"{root} has no {INDEX_FILE}; run `medvl prepare ...` first")
    text_cols = dict.fromkeys(TEXT_COLUMNS, str)
    df = pd.read_csv(
        path, dtype=text_cols, keep_default_na=False, na_values={c: [""] for c in CHEXPERT_LABELS}
    )
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}")
    for c in CHEXPERT_LABELS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float32)
    return df


def label_matrix(df: pd.DataFrame) -> np.ndarray:
    """(N, 14) float32 in CheXpert order; NaN where blank."""
    return df[list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32)


class PreparedDataset(Dataset):
    """A split of a prepared dataset.

    Item: ``{"image": FloatTensor (1, S, S) in [-1024, 1024], "report": str, "labels": FloatTensor (14,)
    (1 / 0 / -1, NaN blank, CheXpert order), "dicom_id", "study_id", "subject_id": str, "index": int}``.
    ``self.index`` stays aligned with items: item ``i`` is ``self.index.iloc[i]``.
    """

    def __init__(self, root: str | Path, split: str | None = None, *, require_report: bool = True):
        self.info = read_meta(root)
        self.root = self.info.root
        df = read_index(self.root)
        if split is not None:
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
            df = df[df["split"] == split]
        if require_report:
            df = df[df["report"].str.strip() != ""]
        self.index = df.reset_index(drop=True)
        self.labels = torch.from_numpy(label_matrix(self.index))
        self._images: np.ndarray | None = None  # opened lazily so the dataset pickles into workers

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            path = self.root / CACHE_FILE
            if not path.exists():
                raise DataError(f"{self.root} has no image cache {CACHE_FILE}")
            self._images = np.load(path, mmap_mode="r")
        return self._images

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> np.ndarray:
        """(S, S) float32 in [-1024, 1024]."""
        return from_uint8(np.asarray(self.images[int(self.index.at[i, "row"])]))

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        return {
            "image": torch.from_numpy(self.image(i)).unsqueeze(0),
            "report": row["report"],
            "labels": self.labels[i],
            "dicom_id": row["dicom_id"],
            "study_id": row["study_id"],
            "subject_id": row["subject_id"],
            "index": i,
        }

    def positions(
        self,
        *,
        views: Sequence[str] | None = None,
        keep_blank_view: bool = True,
        one_per_study: bool = False,
        limit: int = 0,
    ) -> np.ndarray:
        """The rows :meth:`select` keeps, as positions into this dataset (int64, in order)."""
        keep = np.ones(len(self.index), dtype=bool)
        if views is not None:
            view = self.index["view"].str.upper()
            wanted = view.isin([v.upper() for v in views])
            if keep_blank_view:
                wanted |= view == ""
            keep = wanted.to_numpy(dtype=bool)
        pos = np.flatnonzero(keep)
        if one_per_study:
            pos = pos[~self.index["study_id"].iloc[pos].duplicated().to_numpy()]
        if limit > 0:
            pos = pos[:limit]
        return pos.astype(np.int64)

    def select(
        self,
        *,
        views: Sequence[str] | None = None,
        keep_blank_view: bool = True,
        one_per_study: bool = False,
        limit: int = 0,
    ) -> PreparedDataset:
        """A dataset of some of these rows, in their order, ``index`` and ``labels`` aligned with its items.

        ``views``: the rows whose ``view`` is one of these (any case); a blank ``view`` (an image whose view its
        source does not give, kept by ``medvl prepare iu-xray``) stays unless ``keep_blank_view`` is False.
        ``one_per_study``: then the first row of each study. ``limit``: then the first ``limit`` rows (0: all).
        The split is chosen when the dataset is opened (``PreparedDataset(root, split)``).
        """
        pos = self.positions(
            views=views, keep_blank_view=keep_blank_view, one_per_study=one_per_study, limit=limit
        )
        out = copy.copy(self)
        out.index = self.index.iloc[pos].reset_index(drop=True)
        out.labels = self.labels[torch.from_numpy(pos)]
        return out

    def regions(self) -> pd.DataFrame | None:
        """Ground-truth finding boxes (IU-Phantom), or None for datasets without them."""
        path = self.root / REGIONS_FILE
        if not path.exists():
            return None
        df = pd.read_csv(path, dtype={"dicom_id": str}, keep_default_na=False)
        return df[df["dicom_id"].isin(set(self.index["dicom_id"]))].reset_index(drop=True)

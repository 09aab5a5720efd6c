"""The scans a training stage reads from a prepared dataset: which views, how many, resized to the model's
size in [-1, 1], optionally randomly cropped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from medvl.data.prepared import PreparedDataset
from medvl.errors import ConfigError, DataError
from medvl.models.diffusion import to_model_range


@dataclass
class ScanDataConfig:
    """Which scans of the prepared dataset a stage uses."""

    views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # frontal only; blank views are kept
    max_train_images: int = 0  # 0: all
    val_images: int = 128  # validation scans per evaluation (fixed subset)
    crop_size: int = (
        0  # autoencoder only: train on random crops of this size (it is fully convolutional); 0: whole
    )


class RandomCrop(Dataset):
    """Random ``size`` x ``size`` crops of another dataset's (1, s, s) items (no flips: sides stay put)."""

    def __init__(self, base: Dataset, size: int):
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.base[i]
        s = x.shape[-1]
        if self.size >= s:
            return x
        y0, x0 = torch.randint(0, s - self.size + 1, (2,)).tolist()
        return x[..., y0 : y0 + self.size, x0 : x0 + self.size]


def select_scans(ds: PreparedDataset, views: list[str], limit: int = 0) -> list[int]:
    """Indices of ``ds`` whose view is one of ``views`` (blank view kept), at most ``limit`` (0: all)."""
    return ds.positions(views=views, keep_blank_view=True, limit=limit).tolist()


class ScanSubset(Dataset):
    """Images of a prepared split, resized to the model's size: item = (1, s, s) in [-1, 1]."""

    def __init__(self, ds: PreparedDataset, indices: list[int], size: int):
        self.ds, self.indices, self.size = ds, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = torch.from_numpy(self.ds.image(self.indices[i]))[None, None]
        return to_model_range(image, self.size)[0]


def check_image_size(ds: PreparedDataset, size: int, key: str = "model.image_size") -> None:
    """:class:`ConfigError` when the model would see the prepared images enlarged (``size`` above theirs):
    upsampling adds no detail, so such a config is a mistake."""
    if size > ds.size:
        raise ConfigError(
            f"config key '{key}' is {size}, but the prepared dataset {ds.root} holds {ds.size} px images; "
            f"use at most {ds.size}, or prepare the data again with --size {size}"
        )


def open_split(data: Path, split: str, cfg: ScanDataConfig, size: int, limit: int = 0) -> ScanSubset:
    """The ``split`` scans with ``cfg.views`` (at most ``limit``, 0: all); a DataError when there are none,
    a ConfigError when ``size`` exceeds the prepared images' (:func:`check_image_size`)."""
    ds = PreparedDataset(data, split)
    check_image_size(ds, size)
    idx = select_scans(ds, cfg.views, limit)
    if not idx:
        raise DataError(f"{data} has no {split} scans with views {cfg.views}")
    return ScanSubset(ds, idx, size)

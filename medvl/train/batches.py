"""The loop's data order: which samples each rank's micro-batch ``c`` holds over the whole run.

For each epoch a permutation drawn from ``(seed, epoch)``, cut into global batches of
``world_size * batch_size`` (the tail that does not fill one is dropped); rank ``r`` takes slice
``r`` of each global batch. The position in the run is a count of consumed micro-batches, so a
resumed run skips exactly those batches without loading them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from medvl.errors import DataError
from medvl.text.chexpert import NO_FINDING


def oversample_abnormal(dataset: Dataset, labels: torch.Tensor, k: int) -> Dataset:
    """``dataset`` with each item whose report states a finding (``labels`` (N, 14) in CheXpert order, "No Finding"
    not positive) drawn ``k`` times per epoch; ``dataset`` itself when ``k`` is 1."""
    if k == 1:
        return dataset
    normal = labels[:, NO_FINDING] == 1.0
    return Subset(dataset, [i for i in range(len(dataset)) for _ in range(1 if bool(normal[i]) else k)])


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keep_batch(batch: Any) -> Any:
    """The DataLoader's ``collate_fn``: :class:`MicroBatches` items are collated already."""
    return batch


class MicroBatches(Dataset):
    """Item ``c`` is the collated ``c``-th micro-batch of this rank over the whole run.

    Micro-batch ``c`` belongs to epoch ``c // batches_per_epoch``; its samples are rank
    ``rank``'s slice of global batch ``c % batches_per_epoch`` of that epoch's permutation
    (drawn from ``(seed, epoch)`` only). Inside DataLoader worker processes the Python, NumPy
    and torch generators are reseeded from ``(seed, rank, c)`` before loading, so random
    augmentation in a dataset depends on the batch, not on which worker loads it: a resumed
    run gets the same augmentations as an uninterrupted one. With ``num_workers=0`` the dataset
    draws from the main process's generators, which checkpoints restore.
    """

    def __init__(
        self,
        dataset: Dataset,
        collate: Callable[[list[Any]], Any],
        *,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        total: int,
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.total = total
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise DataError("the training set must be a map-style dataset (with __len__ and __getitem__)")
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = self.num_samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training set has {self.num_samples} samples, fewer than one global batch "
                f"({world_size} process(es) x train.batch_size {batch_size}); lower train.batch_size"
            )
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.total

    def position(self, c: int) -> tuple[int, int]:
        """(epoch, micro-batch offset within the epoch) of micro-batch ``c``."""
        return divmod(c, self.batches_per_epoch)

    def indices(self, c: int) -> list[int]:
        epoch, k = self.position(c)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._epoch = epoch
        start = (k * self.world_size + self.rank) * self.batch_size
        return self._perm[start : start + self.batch_size].tolist()

    def __getitem__(self, c: int) -> Any:
        idx = self.indices(c)
        if get_worker_info() is not None:
            seed_all(((self.seed * 1_000_003 + c) * 8191 + self.rank) % 2**63)
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(idx) if callable(getitems) else [self.dataset[i] for i in idx]
        return self.collate(items)


def micro_batch_loader(
    micro: MicroBatches, *, start: int, num_workers: int, pin_memory: bool, seed: int
) -> DataLoader:
    """Micro-batches ``start, start + 1, ...`` of ``micro`` in order (``num_workers`` processes load ahead)."""
    return DataLoader(
        micro,
        batch_size=None,
        sampler=range(start, len(micro)),
        num_workers=num_workers,
        collate_fn=keep_batch,
        pin_memory=pin_memory,
        # its own generator: creating the iterator must not draw from the global one
        generator=torch.Generator().manual_seed(seed),
    )

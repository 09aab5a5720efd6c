"""Reading many scans for a model, in this process or in worker processes (``generate-report --workers N``).

Each scan is read by :func:`medvl.data.scans.read_scan_file` (as a prepared dataset holds it) with its DICOM header
(read without pixels; None for PNG and JPG). A scan that cannot be read gives its error message instead; with
workers, a scan whose reading ends its worker process (a decoder's crash, an out-of-memory kill) gives a message
saying so, and the other scans go on (:mod:`medvl.data.workers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

from medvl.data.images import sniff_format
from medvl.data.prepared import from_uint8
from medvl.data.scans import read_scan_file
from medvl.data.workers import WorkerPool, process_context
from medvl.data.xray import ImageFormat
from medvl.errors import MedvlError

#: The errors that make one scan an error row while the others go on (a missing file is an OSError).
SCAN_ERRORS = (MedvlError, ValueError, OSError, InvalidDicomError)

#: One scan read: its (1, S, S) image and DICOM header, or (None, None, the error message).
Read = tuple[torch.Tensor | None, pydicom.Dataset | None, str]


def dicom_header(path: Path) -> pydicom.Dataset | None:
    with open(path, "rb") as fh:
        head = fh.read(132)
    if sniff_format(path, head) is not ImageFormat.DICOM:
        return None
    return pydicom.dcmread(path, stop_before_pixels=True)


def message(exc: BaseException, path: Path) -> str:
    text = str(exc) or type(exc).__name__
    return text if str(path) in text else f"{path}: {text}"


def _read(
    path: Path, size: int, jpg_compatible: bool
) -> tuple[np.ndarray | None, pydicom.Dataset | None, str]:
    try:
        image, _ = read_scan_file(path, size, jpg_compatible=jpg_compatible)
        return image, dicom_header(path), ""
    except SCAN_ERRORS as exc:
        return None, None, message(exc, path)


@dataclass(frozen=True)
class _ReadJob:
    index: int
    items: tuple[tuple[int, str], ...]
    size: int
    jpg_compatible: bool


def _read_job(job: _ReadJob) -> tuple[int, list]:
    return job.index, [(pos, *_read(Path(path), job.size, job.jpg_compatible)) for pos, path in job.items]


def _as_read(image: np.ndarray | None, header: pydicom.Dataset | None, error: str) -> Read:
    """A worker's (uint8 image, header, error) as the model takes it."""
    return (None if image is None else torch.from_numpy(from_uint8(image)).unsqueeze(0)), header, error


class ScanReader:
    """Reads scans at ``size`` pixels (DICOMs as MIMIC-CXR-JPG was made with ``jpg_compatible``): in this process
    (``workers=1``) or in ``workers`` processes, kept until :meth:`close` (a context manager)."""

    def __init__(self, size: int, workers: int = 1, jpg_compatible: bool = False):
        self.size, self.jpg_compatible = size, jpg_compatible
        self.pool = WorkerPool(_read_job, workers, process_context()) if workers > 1 else None

    def __enter__(self) -> ScanReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def read(self, paths: Sequence[Path]) -> list[Read]:
        """Each scan's image and header, or its error message, in the order of ``paths``."""
        if self.pool is None:
            return [_as_read(*_read(Path(p), self.size, self.jpg_compatible)) for p in paths]
        got: dict[int, Read] = {}

        def finish(k: int, results: list, ended: dict[int, str]) -> None:
            for pos, image, header, error in results:
                got[pos] = _as_read(image, header, error)
            for pos, how in ended.items():
                got[pos] = (None, None, f"{paths[pos]}: reading it ended its worker process ({how})")

        jobs = [_ReadJob(i, ((i, str(p)),), self.size, self.jpg_compatible) for i, p in enumerate(paths)]
        self.pool.run(jobs, finish)
        return [got[i] for i in range(len(paths))]

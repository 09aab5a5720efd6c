"""Data: reading chest X-rays and reports, preparing datasets, and the prepared dataset itself.

Names are imported lazily so that ``import medvl.data.images`` (e.g. in a worker process) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "XRay": "medvl.data.xray",
    "ImageFormat": "medvl.data.xray",
    "ResizeFit": "medvl.data.images",
    "ResizeGeometry": "medvl.data.images",
    "read_xray": "medvl.data.images",
    "read_xray_with_meta": "medvl.data.images",
    "resize_xray": "medvl.data.images",
    "resize_geometry": "medvl.data.images",
    "equalize_histogram_u8": "medvl.data.dicom",
    "read_dicom": "medvl.data.dicom",
    "grey_dicom": "medvl.data.dicom",
    "write_dicom": "medvl.data.dicom",
    "ScanLike": "medvl.data.scans",
    "load_scan": "medvl.data.scans",
    "ReportSection": "medvl.data.reports",
    "ReportSections": "medvl.data.reports",
    "IUReport": "medvl.data.reports",
    "parse_mimic_report": "medvl.data.reports",
    "parse_openi_xml": "medvl.data.reports",
    "iter_iu_reports": "medvl.data.reports",
    "report_text": "medvl.data.reports",
    "PreparedDataset": "medvl.data.prepared",
    "PrepareResult": "medvl.data.ingest",
    "read_index": "medvl.data.prepared",
    "read_meta": "medvl.data.prepared",
    "prepare_mimic": "medvl.data.mimic",
    "prepare_iuxray": "medvl.data.iuxray",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medvl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

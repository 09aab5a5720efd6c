"""What every metrics file records beside the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from medvl.config import config_hash
from medvl.runs import CONFIG_FILE
from medvl.version import __version__


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing metric is null with its reason under "missing"
    return value


def saved_config(run: str | Path) -> dict[str, Any] | None:
    """The resolved config a run was trained with, as saved (``RUN/config.yaml``, plain data); None without one."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def run_config_hash(run: str | Path) -> str | None:
    """:func:`medvl.config.config_hash` of the run's saved config (None without one). The file is the typed
    config's plain-data dump, so this is the hash of the config the run was trained with, read without the
    stage's config class."""
    config = saved_config(run)
    return None if config is None else config_hash(config)


def metrics_record(
    metrics: dict[str, Any],
    *,
    split: str,
    num_samples: int,
    conventions: dict[str, str],
    seed: int | None,
    config_hash: str | None,
    missing: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Flat dotted metric keys (``retrieval.i2t_r1``...) plus provenance."""
    record = dict(_clean(metrics))
    record["meta"] = _clean(
        {
            "split": split,
            "num_samples": num_samples,
            "conventions": conventions,
            "seed": seed,
            "config_hash": config_hash,
            "medvl_version": __version__,
            "missing": missing or {},
            **(extra or {}),
        }
    )
    return record


def write_metrics(path: str | Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False))
    tmp.replace(path)

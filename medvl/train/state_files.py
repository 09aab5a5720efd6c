"""Training state on disk without pickle: tensors in safetensors, everything else as JSON, and a manifest.

A checkpoint holds optimiser, scheduler, stage and random-number-generator states: nested dicts, lists and
tuples of tensors, numbers, strings and NumPy arrays. :func:`save_state` writes one such object to a
``.safetensors`` file: its tensors as the file's tensors, the structure around them as JSON in the file's
metadata (a tensor stands there as ``{"__tensor__": name}``). :func:`load_state` reads it back; neither
side can run code, whatever the file holds. Python's ``random`` state is a tuple of ints, NumPy's legacy
state an array of uint32 words, torch's generator states uint8 tensors: all fit.

:func:`write_manifest` records the name, size and SHA-256 of every file of a checkpoint in
``manifest.json``; :func:`verify_manifest` says what is missing, truncated or changed before a resume
reads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_KEY = "medvl_state"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "medvl-checkpoint"
MANIFEST_VERSION = 1
_MARKERS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


class StateFileError(ValueError):
    """A state file that cannot be read as medvl wrote it (the message names the file)."""


# ----------------------------------------------------------------------------- encode / decode


def _encode(value: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or not t.is_contiguous():  # safetensors refuses shared or strided memory
            t = t.contiguous().clone()
        storages.add(t.untyped_storage().data_ptr())
        name = str(len(tensors))
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, storages) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, storages) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, storages) for k, v in value.items()}
        return {
            "__items__": [
                [_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in value.items()
            ]
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a training state file")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if "__items__" in value:
        return {_freeze(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _freeze(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_state(obj: Any, path: Path) -> None:
    """Write ``obj`` (plain data and tensors, see the module docstring) to the safetensors file ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, set())
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(structure, allow_nan=True)})


def load_state(path: Path) -> Any:
    """The object :func:`save_state` wrote to ``path`` (tensors on the CPU); :class:`StateFileError` for
    anything else."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        if STATE_KEY not in meta:
            raise StateFileError(f"{path} holds no medvl training state")
        return _decode(json.loads(meta[STATE_KEY]), tensors)
    except StateFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateFileError(
            f"{path} is not a readable training state file ({type(exc).__name__}: {exc})"
        ) from None
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        raise StateFileError(
            f"{path} is not a readable training state file ({type(exc).__name__}: {exc})"
        ) from None


# ----------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """``folder/manifest.json``: name, size and SHA-256 of every other file in ``folder``, written last."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    record = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder; :class:`StateFileError` naming what is wrong with it."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise StateFileError(f"{path} is missing (a checkpoint of an older medvl, or a damaged one)")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path} is not valid JSON ({exc})") from None
    files = record.get("files") if isinstance(record, dict) else None
    ok = (
        isinstance(files, dict)
        and record.get("format") == MANIFEST_FORMAT
        and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    )
    if not ok:
        raise StateFileError(f"{path} is not a medvl checkpoint manifest")
    if record.get("version") != MANIFEST_VERSION:
        raise StateFileError(
            f"{path} has version {record.get('version')}; this medvl reads {MANIFEST_VERSION}"
        )
    return record


def verify_manifest(folder: Path, required: list[str]) -> dict[str, Any]:
    """The manifest of ``folder`` after checking every file it lists (present, same size, same SHA-256) and
    that it lists each of ``required``; :class:`StateFileError` naming the first file that fails."""
    record = read_manifest(folder)
    files = record["files"]
    for name in required:
        if name not in files:
            raise StateFileError(f"{folder / MANIFEST_FILE} does not list {name}")
    for name, entry in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise StateFileError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise StateFileError(
                f"{path} has {size} bytes, its manifest says {entry['size']} (truncated or replaced)"
            )
        if _sha256(path) != entry["sha256"]:
            raise StateFileError(
                f"{path} does not match the SHA-256 in its manifest (changed after it was written)"
            )
    return record

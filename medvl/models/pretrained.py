"""One on-disk format for every saved medvl component, after Hugging Face's ``save_pretrained``.

A component is a folder::

    config.json         {"format": "medvl.<kind>", "layout": 2, "medvl_version": "...", "config": {...}, ...}
    model.safetensors   its tensors (safetensors only: loading never unpickles anything)
    ...                 the tokenizer files or ``scheduler_config.json`` where the component has them

Every component class has ``save_pretrained(directory) -> Path`` and the classmethod
``from_pretrained(directory, device="cpu")``. A run directory is a folder of such components (``adamatch/``,
``memory/``, ``report_head/``, ``autoencoder/``, ``diffusion/``) beside the run's ``stage.json`` and
``config.yaml``; a later stage copies the components it builds on into its own run (:func:`copy_component`),
so every run works alone.

``layout`` counts generations of this format. A folder written in an older one (layout 1: ``adamatch.json``,
``memory.yaml``, ``latent.json``, ``head.json``, ``report_head.json``, ``classifier.json``... and no
``config.json``) is refused with a one-line :class:`~medvl.errors.RunError` naming the medvl that reads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medvl.errors import RunError
from medvl.version import __version__

LAYOUT = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"

#: The medvl releases that wrote each older layout (named in the error for a folder in that layout).
OLDER_LAYOUTS = {1: "0.1.x"}
#: Files that only layout 1 wrote, one or more in every component folder (or run root) of that layout.
LAYOUT1_FILES = (
    "adamatch.json",
    "keywords.json",
    "keypatches.json",
    "memory.yaml",
    "memory.safetensors",
    "autoencoder.yaml",
    "latent.json",
    "autoencoder.safetensors",
    "head.json",
    "denoiser.safetensors",
    "scheduler.json",
    "report_head.json",
    "report_head.safetensors",
    "classifier.json",
    "classifier.safetensors",
)

__all__ = [
    "LAYOUT",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "SCHEDULER_CONFIG_FILE",
    "write_config",
    "read_config",
    "save_weights",
    "load_weights",
    "component_dir",
    "is_component",
    "copy_component",
]


def _older_layout_error(directory: Path, layout: int, version: str | None = None) -> RunError:
    by = version or OLDER_LAYOUTS.get(layout, "an older release")
    return RunError(
        f"{directory} was saved by medvl {by} (layout {layout}); this medvl {__version__} reads layout "
        f"{LAYOUT}: load it with medvl {by} or train it again"
    )


def write_config(
    directory: str | Path,
    format: str,
    config: Mapping[str, Any] | None = None,
    *,
    filename: str = CONFIG_FILE,
    **fields: Any,
) -> Path:
    """Write ``directory/filename`` (``config.json``): format name, layout, medvl version, the component's
    resolved ``config`` and any further JSON ``fields``. Creates ``directory``; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"format": format, "layout": LAYOUT, "medvl_version": __version__}
    if config is not None:
        payload["config"] = dict(config)
    payload.update(fields)
    path = directory / filename
    path.write_text(json.dumps(payload, indent=2))
    return path


def read_config(
    directory: str | Path,
    format: str | None,
    *,
    what: str | None = None,
    hint: str = "",
    filename: str = CONFIG_FILE,
) -> dict[str, Any]:
    """The ``config.json`` (or ``filename``) of a saved component, checked to be of this layout and of ``format``
    (any format when None).

    :class:`RunError` in one line when the folder is missing, holds no such component (``what`` names it, ``hint``
    says how to make one), was saved in another layout (naming the medvl that reads it) or is another component.
    """
    directory = Path(directory)
    what = what or format or "saved medvl component"
    if not directory.is_dir():
        raise RunError(f"{directory} does not exist")
    path = directory / filename
    if not path.is_file():
        if any((directory / name).exists() for name in LAYOUT1_FILES):
            raise _older_layout_error(directory, 1)
        raise RunError(f"{directory} holds no {what} (no {filename}){'; ' + hint if hint else ''}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "format" not in data:
        raise RunError(f"{path} was not written by medvl (no format name); {directory} holds no {what}")
    layout = data.get("layout")
    if layout != LAYOUT:
        raise _older_layout_error(directory, int(layout or 1), data.get("medvl_version"))
    if format is not None and data["format"] != format:
        raise RunError(f"{directory} holds a {data['format']} component, not a {format} ({what})")
    return data


def save_weights(
    directory: str | Path, state: Mapping[str, torch.Tensor], filename: str = WEIGHTS_FILE
) -> Path:
    """``directory/model.safetensors`` from a state dict (tensors moved to the CPU, made contiguous)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
    return path


def load_weights(
    directory: str | Path, device: str | torch.device = "cpu", filename: str = WEIGHTS_FILE
) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/model.safetensors``; :class:`RunError` when the file is missing."""
    path = Path(directory) / filename
    if not path.is_file():
        raise RunError(f"{Path(directory)} is incomplete: {filename} is missing")
    return load_file(str(path), device=str(device))


def component_dir(path: str | Path, dirname: str) -> Path:
    """The component folder meant by ``path``: ``path`` itself when it holds a ``config.json``, else
    ``path/dirname`` when that folder exists (``path`` is a run holding the component), else ``path``
    (so that :func:`read_config` names what is wrong there)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / dirname).is_dir():
        return path / dirname
    return path


def is_component(directory: str | Path, format: str | None = None) -> bool:
    """Whether ``directory`` holds a component saved in this layout (of ``format``, when given)."""
    try:
        data = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        isinstance(data, dict)
        and data.get("layout") == LAYOUT
        and (format is None or data.get("format") == format)
    )


def copy_component(source: str | Path, destination: str | Path) -> Path:
    """Copy a saved component folder to ``destination`` (replacing what is there), so that the run holding
    ``destination`` works alone. ``source`` is the component folder or a run holding it as
    ``source/<destination's name>``; a folder in an older layout is refused (:func:`read_config`). Returns
    ``destination``."""
    destination = Path(destination)
    src = component_dir(source, destination.name)
    read_config(src, None, what=f"saved medvl component ({destination.name}/) to copy")
    if destination.exists() and destination.resolve() == src.resolve():
        return destination
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(src, destination)
    return destination

"""The package list, the one packaging fact pyproject.toml cannot state.

The presets stay in ``configs/`` at the top of the repository and install as the package ``medvl.configs``
(``package-dir`` and ``package-data`` in pyproject.toml). setuptools' ``packages.find`` cannot name a package whose
folder is not under ``medvl/``, so the list is built here: every folder under ``medvl/`` (with or without an
``__init__.py``), ``medvl.configs`` and one entry per preset folder (``configs/<stage>/``, data only).
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

CONFIGS = Path(__file__).resolve().parent / "configs"
MEDVL = find_namespace_packages(include=["medvl", "medvl.*"], exclude=["*.__pycache__"])
PRESET_FOLDERS = sorted(f"medvl.configs.{d.name}" for d in CONFIGS.iterdir() if d.is_dir() and any(d.glob("*.yaml")))

setup(packages=[*MEDVL, "medvl.configs", *PRESET_FOLDERS])

"""medvl: chest X-ray vision-language in one package.

Pretrain adaptive patch-word alignment (AdaMatch), generate reports from scans and
synthesize scans from reports, with boxes and words as explanations.

``medvl.load(RUN)`` and ``medvl.Pipeline`` come from :mod:`medvl.api`, imported on first use so
that ``import medvl`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medvl.version import __version__

if TYPE_CHECKING:
    from medvl.api import Pipeline, load

__all__ = ["__version__", "Pipeline", "load"]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "load"):
        from medvl import api

        return getattr(api, name)
    raise AttributeError(f"module 'medvl' has no attribute {name!r}")

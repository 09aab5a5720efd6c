"""medvl: chest X-ray vision-language in one package.

Pretrain adaptive patch-word alignment (AdaMatch), generate reports from scans and
synthesize scans from reports, with boxes and words as explanations.
"""

from __future__ import annotations

from medvl.version import __version__

__all__ = ["__version__", "load"]


def load(run_dir, device: str | None = None):
    """Load a trained run directory for inference (see :mod:`medvl.api`)."""
    from medvl.api import load as _load

    return _load(run_dir, device=device)

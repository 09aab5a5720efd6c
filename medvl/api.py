"""Python API: load a trained run and use it.

``medvl.load(RUN)`` returns a :class:`Pipeline` with ``generate_report``, ``synthesize``,
``explain`` and ``match``. The command-line helpers below are what ``medvl`` calls.
"""

from __future__ import annotations

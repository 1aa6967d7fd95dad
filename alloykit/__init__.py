"""alloykit: training-free model merging.

The one-call API is :func:`alloykit.merge`; the pieces it wires are importable on their own:
``alloykit.io`` (checkpoints), ``alloykit.engine`` (planning and streaming),
``alloykit.methods`` (the merge methods), ``alloykit.recipe`` (YAML recipes).

Importing the package is cheap: torch and the engine load on first use of ``merge`` (the CLI's
``--help`` answers without them).
"""

import os as _os
from typing import Any as _Any

# Merges run many short torch kernels; OpenMP threads that spin between them starve everything
# else on a busy machine (measured 4–10× slower with one worker). Only a default: a value the
# user set wins, and it has no effect if torch was imported before alloykit.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__", "merge", "merge_state_dicts"]


def __getattr__(name: str) -> _Any:
    if name in ("merge", "merge_state_dicts"):
        from alloykit import api

        return getattr(api, name)
    raise AttributeError(f"module 'alloykit' has no attribute {name!r}")

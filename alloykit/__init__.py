"""alloykit: training-free model merging.

The one-call API is :func:`alloykit.merge`; the pieces it wires are importable on their own:
``alloykit.io`` (checkpoints), ``alloykit.engine`` (planning and streaming),
``alloykit.methods`` (the merge methods), ``alloykit.recipe`` (YAML recipes).
"""

import os as _os

# Merges run many short torch kernels; OpenMP threads that spin between them starve everything
# else on a busy machine (measured 4–10× slower with one worker). Only a default: a value the
# user set wins, and it has no effect if torch was imported before alloykit.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from alloykit.api import merge, merge_state_dicts  # noqa: E402

__all__ = ["__version__", "merge", "merge_state_dicts"]

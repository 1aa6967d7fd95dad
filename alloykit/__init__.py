"""alloykit: training-free model merging.

The one-call API is :func:`alloykit.merge`; the pieces it wires are importable on their own:
``alloykit.io`` (checkpoints), ``alloykit.engine`` (planning and streaming),
``alloykit.methods`` (the merge methods), ``alloykit.recipe`` (YAML recipes).
"""

__version__ = "0.1.0"

from alloykit.api import merge, merge_state_dicts  # noqa: E402

__all__ = ["__version__", "merge", "merge_state_dicts"]

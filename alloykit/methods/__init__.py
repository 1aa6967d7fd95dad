"""Merge methods, one module each, registered by name on import.

Use :func:`get_method` to look one up; ``REGISTRY`` lists them all.
"""

from alloykit.methods import dare, linear, magnitude_prune, task_arithmetic, ties  # noqa: F401
from alloykit.methods.base import (
    REGISTRY,
    MergeMethod,
    Param,
    Reduction,
    TensorContext,
    get_method,
    merge_method,
)

__all__ = [
    "REGISTRY",
    "MergeMethod",
    "Param",
    "Reduction",
    "TensorContext",
    "get_method",
    "merge_method",
]

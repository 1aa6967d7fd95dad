"""Merge methods, one module each, registered by name when this package is imported.

Every module of this package that declares a method with ``@merge_method`` is imported here, so
a new method is one new file. Use :func:`get_method` to look one up; ``REGISTRY`` lists them all.
Modules whose name starts with ``_`` and the shared ``base``/``primitives`` are helpers.
"""

import importlib
import pkgutil

from alloykit.methods.base import (
    REGISTRY,
    MergeMethod,
    Param,
    Reduction,
    TensorContext,
    get_method,
    merge_method,
)

_HELPERS = {"base", "primitives"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_") and _info.name not in _HELPERS:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "MergeMethod", "Param", "Reduction", "TensorContext", "get_method", "merge_method"]

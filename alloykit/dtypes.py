"""Names of dtypes as recipes and the CLI write them."""

from __future__ import annotations

import torch

from alloykit.errors import ParameterError

_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return None
    try:
        return _NAMES[key]
    except KeyError:
        raise ParameterError(
            f"{what} = {name!r} is not allowed; expected one of float32, bfloat16, float16, float64 or auto"
        ) from None


def dtype_name(dtype: torch.dtype | None) -> str:
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")

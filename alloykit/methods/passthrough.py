"""Passthrough: one model, copied (optionally scaled per tensor)."""

from __future__ import annotations

import torch

from alloykit.methods.base import Param, TensorContext, merge_method


@merge_method(
    "passthrough",
    params=[
        Param(
            "scale",
            float,
            1.0,
            per_model=True,
            help="multiplies the tensor (with filters: only some tensors); 1 copies it unchanged",
        ),
    ],
    needs_base=False,
    presets={"mergekit": {}},
    default_preset="mergekit",
    min_models=1,
    max_models=1,
    memory_factor=1.0,
    elementwise=True,
)
def passthrough(
    tensors: list[torch.Tensor], base: torch.Tensor | None, ctx: TensorContext, *, scale: list[float]
) -> torch.Tensor:
    """Passthrough: θ = s · θ_1, the one model's tensor, copied (s = 1) or scaled by ``scale``.

    mergekit 0.1.5 ``merge_methods/passthrough.py``: its ``scale`` is per input and unset by
    default (the tensor is returned as it is); set, the tensor is multiplied by it in the compute
    dtype. Here s = 1 returns the tensor itself, any other value multiplies, so the ``mergekit``
    preset gives its tensors bit for bit. The base model, if any, is not used (a mergekit recipe's
    ``base_model`` is an input, so passthrough with a base and a model is refused, as in
    mergekit). Not supported yet: mergekit's main use of passthrough, stacking layer ranges of
    several models with ``slices:`` (a mergekit recipe with ``slices:`` is refused).
    """
    x = tensors[0]
    return x if scale[0] == 1 else x * scale[0]

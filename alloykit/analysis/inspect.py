"""Looking at task vectors before merging: how large, how aligned, how much they conflict."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from alloykit.errors import MismatchError
from alloykit.io import open_checkpoint

_LAYER_PREFIX = re.compile(r"^(.*?(?:layers|layer|h|blocks|block)\.\d+)\.")


def _group(name: str, by: str) -> str:
    if by == "tensor":
        return name
    m = _LAYER_PREFIX.match(name)
    return m.group(1) if m else name


def inspect_task_vectors(models: Sequence[Any], base: Any, by: str = "layer") -> dict[str, Any]:
    """Stream over the tensors common to all models and return, with τ_t = θ_t − θ₀:

    * ``groups[g]["norm"][t]`` = ‖τ_t‖ restricted to group g (a layer, or a tensor);
    * ``groups[g]["sign_conflict_rate"]``: fraction of entries where some models move up and
      others down (both a positive and a negative τ_t entry);
    * ``cosine[i][j]`` = ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖) over the whole model;
    * ``relative_norm[label]`` = ‖τ_t‖ / ‖θ₀‖: fine-tunes are typically ≪ 0.5, an unrelated model
      (another initialisation) is near √2.
    """
    if by not in ("layer", "tensor"):
        raise ValueError(f"by = {by!r} is not allowed; expected 'layer' or 'tensor'")
    readers = [
        open_checkpoint(m, str(m) if not isinstance(m, dict) else f"model_{i}") for i, m in enumerate(models)
    ]
    b = open_checkpoint(base, str(base) if not isinstance(base, dict) else "base")
    key_sets = [set(r.keys()) for r in readers]
    names = [n for n in b.keys() if all(n in ks for ks in key_sets)]
    floating = [n for n in names if b.meta(n).dtype.is_floating_point]
    if not floating:
        held = ", ".join(f"{r.label}: {len(ks)}" for r, ks in zip(readers, key_sets, strict=True))
        raise MismatchError(
            f"the models share no floating-point tensor with the base {b.label} "
            f"({len(b.keys())} tensors; {held}): nothing to compare. Are these models of the same "
            "architecture, saved with the same tensor names?"
        )
    T = len(readers)
    gram = torch.zeros(T, T, dtype=torch.float64)
    base_sq = 0.0
    groups: dict[str, dict[str, Any]] = {}
    conflicts = 0
    total = 0
    for name in names:
        meta = b.meta(name)
        if not meta.dtype.is_floating_point:
            continue
        for r in readers:
            if r.meta(name).shape != meta.shape:
                raise MismatchError(
                    f"tensor {name!r}: {r.label} has shape {list(r.meta(name).shape)}, "
                    f"the base {list(meta.shape)}"
                )
        theta0 = b.read(name).float()
        d = torch.stack([r.read(name).float() - theta0 for r in readers]).reshape(T, -1)
        base_sq += float(theta0.double().square().sum())
        gram += d.double() @ d.double().T
        conflict = int(((d > 0).any(0) & (d < 0).any(0)).sum())
        g = groups.setdefault(_group(name, by), {"sq": [0.0] * T, "conflicts": 0, "numel": 0})
        for t in range(T):
            g["sq"][t] += float(d[t].double().square().sum())
        g["conflicts"] += conflict
        g["numel"] += d.shape[1]
        conflicts += conflict
        total += d.shape[1]
    norms = torch.sqrt(torch.diag(gram))
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / denom.clamp(min=1e-300), torch.zeros_like(gram))
    labels = [r.label for r in readers]
    return {
        "models": labels,
        "base": b.label,
        "groups": {
            k: {
                "norm": [math.sqrt(v) for v in g["sq"]],
                "sign_conflict_rate": g["conflicts"] / max(g["numel"], 1),
            }
            for k, g in groups.items()
        },
        "cosine": cosine.tolist(),
        "relative_norm": {
            lab: (float(norms[i]) / math.sqrt(base_sq) if base_sq > 0 else math.inf)
            for i, lab in enumerate(labels)
        },
        "sign_conflict_rate": conflicts / max(total, 1),
    }

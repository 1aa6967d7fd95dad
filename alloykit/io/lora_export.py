"""A model's difference from its base, written as a PEFT LoRA adapter (``alloykit extract-lora``).

For every weight matrix of a Linear, GPT-2 Conv1D or Embedding module that differs from the
base, Δ = θ − θ₀ is truncated to its top singular triplets, Δ ≈ U_r Σ_r V_rᵀ, and stored as
B = U_r Σ_r, A = V_rᵀ (for Conv1D and Embedding, whose PEFT update is (B·A)ᵀ, the same of Δᵀ).
The rank is fixed (``rank``) or, per module, the smallest that keeps a fraction ``energy`` of
‖Δ‖²_F (``max_rank`` caps it); each module's rank and alpha go into ``rank_pattern`` and
``alpha_pattern`` with alpha = rank, so PEFT's scale is 1. Other changed tensors: those of modules
that hold no adapted matrix (norms) go to ``modules_to_save``; anything else that changed (the
bias of an adapted Linear, a convolution kernel) cannot be expressed and is listed as dropped
with its relative change. Nothing is skipped silently: the report says, per module, its rank,
the energy kept and the relative error ‖Δ − BA‖_F / ‖Δ‖_F.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import MismatchError, ParameterError
from alloykit.io.readers import TensorMeta, open_checkpoint
from alloykit.io.writer import StreamingWriter
from alloykit.methods._svd import thin_svd

_PREFIX = "base_model.model."


@dataclass
class LoraExport:
    output: Path | None = None
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # module: rank, energy, error
    saved: list[str] = field(default_factory=list)  # modules_to_save
    dropped: dict[str, float] = field(default_factory=dict)  # tensor: ‖Δ‖/‖θ₀‖
    unchanged: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "modules": self.modules,
            "modules_to_save": self.saved,
            "dropped": self.dropped,
            "unchanged_tensors": self.unchanged,
        }


def module_kinds(folder: Path | None, names: list[str]) -> dict[str, str]:
    """``{weight name: linear | conv1d | embedding}`` from the model class its ``config.json``
    names, built on the meta device (no memory, no download). Without a config or transformers:
    2-D ``*.weight`` tensors are taken as Linear, those whose module name says ``embed`` as
    Embedding."""
    kinds: dict[str, str] = {}
    model = None
    if folder is not None and (folder / "config.json").is_file():
        try:
            import transformers

            cfg = transformers.AutoConfig.from_pretrained(folder)
            arch = (cfg.architectures or [None])[0]
            cls = getattr(transformers, arch) if arch else None
            if cls is not None:
                with torch.device("meta"):
                    model = cls(cfg)
        except (ImportError, OSError, ValueError, AttributeError, TypeError):
            model = None
    if model is not None:
        from transformers.pytorch_utils import Conv1D

        for path, mod in model.named_modules():
            kind = (
                "linear"
                if isinstance(mod, torch.nn.Linear)
                else "conv1d"
                if isinstance(mod, Conv1D)
                else "embedding"
                if isinstance(mod, torch.nn.Embedding)
                else None
            )
            if kind:
                kinds[f"{path}.weight"] = kind
        if any(n in kinds for n in names):
            return kinds
    for n in names:
        if n.endswith(".weight"):
            kinds[n] = "embedding" if "embed" in n.rsplit(".", 2)[0] else "linear"
    return kinds


def _rank(s: torch.Tensor, rank: int | None, energy: float | None, max_rank: int | None) -> int:
    r = s.numel()
    if energy is not None:
        e = s.double().square()
        kept = torch.cumsum(e, 0) / e.sum()
        r = int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1
    elif rank is not None:
        r = rank
    if max_rank is not None:
        r = min(r, max_rank)
    return max(1, min(r, s.numel()))


def extract_lora(
    model: str | os.PathLike,
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int | None = 16,
    energy: float | None = None,
    max_rank: int | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    log: Any = None,
) -> LoraExport:
    """Write ``model − base`` as a PEFT LoRA adapter folder ``output`` (atomically); see the module
    docstring. ``dtype``: of the factors (default: the base's)."""
    from alloykit.dtypes import parse_dtype

    if energy is not None and not 0 < energy <= 1:
        raise ParameterError(f"energy = {energy}; expected a fraction in (0, 1]")
    if energy is None and (rank is None or rank < 1):
        raise ParameterError(f"rank = {rank}; expected a positive integer (or give energy)")
    if max_rank is not None and max_rank < 1:
        raise ParameterError(f"max_rank = {max_rank}; expected a positive integer")
    fine, ref = open_checkpoint(model), open_checkpoint(base)
    if set(fine.keys()) != set(ref.keys()):
        extra = sorted(set(fine.keys()) ^ set(ref.keys()))[:5]
        raise MismatchError(f"{fine.label} and the base {ref.label} hold different tensors, e.g. {extra}")
    kinds = module_kinds(ref.folder, ref.keys())
    if any(k == "conv1d" for k in kinds.values()) and any(k == "linear" for k in kinds.values()):
        # PEFT's fan_in_fan_out is one flag for the whole adapter: Conv1D models (GPT-2) adapt
        # their Conv1D layers; their Linear head is then saved whole if it changed.
        kinds = {n: k for n, k in kinds.items() if k != "linear"}
    out_dtype = parse_dtype(dtype, "dtype")
    result = LoraExport()
    factors: dict[str, torch.Tensor] = {}
    changed_other: dict[str, float] = {}
    for name in ref.keys():
        a, b = fine.read(name), ref.read(name)
        if a.shape != b.shape:
            raise MismatchError(f"{name}: {list(a.shape)} in {fine.label}, {list(b.shape)} in the base")
        if not a.is_floating_point() or torch.equal(a, b):
            result.unchanged += 1
            continue
        delta = a.float() - b.float()
        kind = kinds.get(name)
        if kind is None or delta.dim() != 2:
            changed_other[name] = float(delta.norm() / b.float().norm().clamp(min=1e-30))
            continue
        module = name[: -len(".weight")]
        target = delta if kind == "linear" else delta.mT
        u, s, vh = thin_svd(target)
        r = _rank(s, rank, energy, max_rank)
        e = s.double().square()
        kept = float(e[:r].sum() / e.sum())
        fdt = out_dtype or b.dtype
        lora_b = (u[:, :r] * s[:r]).to(fdt).contiguous()
        lora_a = vh[:r].to(fdt).contiguous()
        err = float((target - lora_b.float() @ lora_a.float()).norm() / target.norm())
        result.modules[module] = {"kind": kind, "rank": r, "energy": kept, "relative_error": err}
        if kind == "embedding":
            factors[f"{_PREFIX}{module}.lora_embedding_A"] = lora_a
            factors[f"{_PREFIX}{module}.lora_embedding_B"] = lora_b
        else:
            factors[f"{_PREFIX}{module}.lora_A.weight"] = lora_a
            factors[f"{_PREFIX}{module}.lora_B.weight"] = lora_b
    adapted = set(result.modules)
    for name, rel in changed_other.items():
        module = name.rsplit(".", 1)[0]
        if module in adapted:
            result.dropped[name] = rel
        elif module not in result.saved:
            result.saved.append(module)
    for module in result.saved:  # the whole module: every tensor of it, changed or not
        for name in ref.keys():
            if name.rsplit(".", 1)[0] == module:
                factors[f"{_PREFIX}{name}"] = fine.read(name).contiguous()
    if not result.modules and not result.saved:
        raise MismatchError(f"{fine.label} does not differ from the base {ref.label}: nothing to extract")
    ranks = [m["rank"] for m in result.modules.values()]
    default = max(set(ranks), key=ranks.count) if ranks else 1
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base),
        "r": default,
        "lora_alpha": default,
        "rank_pattern": {m: v["rank"] for m, v in result.modules.items() if v["rank"] != default},
        "alpha_pattern": {m: v["rank"] for m, v in result.modules.items() if v["rank"] != default},
        "target_modules": sorted(adapted),
        "modules_to_save": result.saved or None,
        "fan_in_fan_out": any(v["kind"] == "conv1d" for v in result.modules.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    metas = [TensorMeta(k, tuple(v.shape), v.dtype) for k, v in factors.items()]
    with StreamingWriter(output, metas, force=force, stem="adapter_model") as writer:
        for k, v in factors.items():
            writer.write(k, v)
        writer.write_text("adapter_config.json", json.dumps(config, indent=2) + "\n")
        report = {"model": fine.label, "base": ref.label, **result.as_dict()}
        writer.write_text("alloykit_extract.json", json.dumps(report, indent=2) + "\n")
        result.output = writer.commit()
    if log:
        adapted_n, saved_n, dropped_n = len(result.modules), len(result.saved), len(result.dropped)
        log(f"{adapted_n} modules adapted, {saved_n} saved whole, {dropped_n} tensors dropped")
    return result

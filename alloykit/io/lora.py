"""PEFT LoRA adapters as models: θ = θ₀ + scale · B·A on the adapter's target tensors.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is read whole (its
factors are small); the dense weight of an adapted tensor is built only when the engine reads that
tensor, or the slice of it a job needs (the rows of B·A that cover the slice), so no dense model
is ever held in memory. Every other tensor is the base's. ``scale`` = ``lora_alpha / r``
(``lora_alpha / √r`` with ``use_rslora``), with PEFT's per-module ``rank_pattern`` and
``alpha_pattern``. ``fan_in_fan_out`` (GPT-2's Conv1D, weight stored in × out) transposes B·A;
``lora_embedding_A``/``_B`` (adapted embeddings) give (B·A)ᵀ. ``modules_to_save`` tensors replace
the base's. DoRA and non-LoRA PEFT types are refused with a message.

The adapted weight is computed in float32 (θ₀ upcast plus the float32 product) and not rounded to
the base's dtype: PEFT's ``merge_and_unload`` on a bf16 model rounds θ₀ + BA to bf16, which
erases most of a small update; here the method sees the update at full precision.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import CheckpointError, MismatchError
from alloykit.io.readers import CheckpointReader, SafetensorsFile, TensorMeta

_PREFIX = "base_model.model."
_BLOCK = 256  # rows of B·A per product
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?\.weight$"
)
_FACTOR_EMB = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(\.[^.]+)?$")


def is_adapter(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key that is the module name or matches its end."""
    for key, value in patterns.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class LoraReader:
    """A model given as a LoRA adapter on a base checkpoint (:data:`CheckpointReader`)."""

    def __init__(self, folder: str | Path, base: CheckpointReader, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        self.base = base
        cfg = self._config()
        files = [self.folder / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
        found = [f for f in files if f.is_file()]
        if not found:
            raise CheckpointError(f"{self.folder}: adapter_config.json but no adapter_model.safetensors")
        self._file = found[0]
        if found[0].suffix == ".bin":
            from alloykit.io.readers import _load_pickle

            tensors = _load_pickle(found[0])
        else:
            raw = SafetensorsFile(found[0])
            tensors = {k: raw.read(k) for k in raw.keys()}
            raw.close()
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        self._parse(tensors, cfg)

    # ------------------------------------------------------------------------------- reading
    def _config(self) -> dict[str, Any]:
        path = self.folder / "adapter_config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable adapter config ({e})") from None
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise CheckpointError(f"{self.folder}: a {kind} adapter; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise CheckpointError(
                f"{self.folder}: a DoRA adapter (use_dora: true); its magnitude vectors are not "
                "supported yet. Merge it into its base with peft (merge_and_unload) and give that folder."
            )
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{self.folder}: adapter rank r = {r!r}; expected a positive integer")
        if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
            raise CheckpointError(f"{self.folder}: lora_alpha = {alpha!r}; expected a positive number")
        return cfg

    def _scale(self, cfg: dict[str, Any], module: str, rank: int) -> float:
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        if r != rank:
            raise CheckpointError(
                f"{self.folder}: module {module!r} has rank {rank} in the file, {r} in the config"
            )
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def _parse(self, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
        factors: dict[str, dict[str, torch.Tensor]] = {}
        base_keys = set(self.base.keys())
        for key, t in tensors.items():
            name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            m = _FACTOR.match(name) or _FACTOR_EMB.match(name)
            if m:
                factors.setdefault(m["module"], {})[m["kind"]] = t
                continue
            if ".base_layer." in name:
                continue  # PEFT's copy of an adapted embedding's base weight: the base's own
            # modules_to_save: a full tensor that replaces the base's
            name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
            if name not in base_keys:
                raise CheckpointError(
                    f"{self.folder}: saved tensor {key!r} has no counterpart {name!r} in the base"
                )
            self.replaced[name] = t
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        for module, parts in factors.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a = parts.get("lora_embedding_A" if emb else "lora_A")
            b = parts.get("lora_embedding_B" if emb else "lora_B")
            if a is None or b is None:
                raise CheckpointError(
                    f"{self.folder}: module {module!r} lacks its {'B' if a is not None else 'A'} factor"
                )
            target = f"{module}.weight"
            if target not in base_keys:
                raise MismatchError(
                    f"{self.folder}: the adapter targets {target!r}, which the base "
                    f"{self.base.label} does not have; is this the adapter's base model?"
                )
            if a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"{self.folder}: {module!r}: A is {list(a.shape)}, B is {list(b.shape)}"
                )
            transpose = emb or fan_in_fan_out
            shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            want = self.base.meta(target).shape
            if tuple(shape) != tuple(want):
                raise MismatchError(
                    f"{self.folder}: the adapter's {module!r} update is {list(shape)} but the base's "
                    f"{target!r} is {list(want)}: the adapter was trained on another base model"
                )
            scale = self._scale(cfg, module, a.shape[0])
            self.adapters[target] = (a.float(), b.float(), scale, transpose)

    # ------------------------------------------------------------------------------- reader
    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def _delta_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of scale · B·A in the weight's layout. Computed in fixed blocks of
        ``_BLOCK`` rows whatever range is asked, so a slice holds the very bits of the whole
        tensor (a matrix product's rounding can depend on how many rows it is given)."""
        a, b, scale, transpose = self.adapters[name]
        lo = (r0 // _BLOCK) * _BLOCK
        blocks = []
        for i in range(lo, r1, _BLOCK):
            if transpose:  # W is (in × out): its rows are A's columns
                blocks.append((a[:, i : i + _BLOCK].mT @ b.mT) * scale)
            else:
                blocks.append((b[i : i + _BLOCK] @ a) * scale)
        return torch.cat(blocks)[r0 - lo : r1 - lo]

    def read(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name]
        w = self.base.read(name)
        if name not in self.adapters:
            return w
        return w.float() + self._delta_rows(name, 0, w.shape[0])

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name].reshape(-1)[start : start + length]
        w = self.base.read_range(name, start, length)
        if name not in self.adapters or length == 0:
            return w
        cols = self.meta(name).shape[1]
        r0, r1 = start // cols, -(-(start + length) // cols)
        rows = self._delta_rows(name, r0, r1).reshape(-1)
        offset = start - r0 * cols
        return w.float() + rows[offset : offset + length]

    def fingerprint(self) -> dict:
        return {
            "format": "peft_lora",
            "adapter": {"file": self._file.name, "bytes": self._file.stat().st_size},
            "adapted_tensors": len(self.adapters),
            "replaced_tensors": len(self.replaced),
            "base": self.base.label,
        }

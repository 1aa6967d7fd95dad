"""A checkpoint assembled from layers of other checkpoints (mergekit's ``slices:``).

Layer stacking ("frankenmerges") builds a model whose layer L is layer i of some input: the
engine merges by tensor names, so such a model is one more reader, whose tensor
``model.layers.L.mlp.up_proj.weight`` is read, lazily, as ``model.layers.i.mlp.up_proj.weight``
of the input. Tensors outside the layers come from the inputs of the first slice (embeddings,
which come before the layers) or of the last slice (the final norm and the head), as in mergekit.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import RecipeError
from alloykit.io.readers import CheckpointReader, TensorMeta

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Tensors outside the layers that come before them (from the first slice's models); the others
# (final norm, head) come after them (from the last slice's models).
_BEFORE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings")


def layer_of(name: str) -> tuple[str, int] | None:
    """(the name with ``{}`` in place of the layer number, the number), or None outside layers."""
    m = LAYER.search(name)
    if m is None:
        return None
    return name[: m.start(1)] + "{}" + name[m.end(1) :], int(m.group(1))


def count_layers(keys: list[str]) -> int:
    """1 + the largest layer number in the names (0 without layers)."""
    found = [p[1] for k in keys if (p := layer_of(k)) is not None]
    return max(found) + 1 if found else 0


def layer_stacks(keys: list[str]) -> set[str]:
    """Prefixes before the layer number (``model.layers.``): more than one means several stacks
    of layers (a vision tower beside a language model)."""
    return {k[: m.start(1)] for k in keys if (m := LAYER.search(k)) is not None}


class StackedReader:
    """Tensors of other readers under new names: ``entries[out_name] = (reader, name there)``."""

    def __init__(
        self,
        label: str,
        entries: dict[str, tuple[CheckpointReader, str]],
        folder: Path | None,
        config_updates: dict[str, Any] | None = None,
    ):
        self.label = label
        self.folder = folder
        self._entries = entries
        # written into the output's config.json (the new number of layers)
        self.config_updates = config_updates or {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        reader, src = self._entries[name]
        m = reader.meta(src)
        return TensorMeta(name, m.shape, m.dtype)

    def read(self, name: str) -> torch.Tensor:
        reader, src = self._entries[name]
        return reader.read(src)

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        reader, src = self._entries[name]
        return reader.read_range(src, start, length)

    def fingerprint(self) -> dict:
        mapping = {k: [r.label, s] for k, (r, s) in self._entries.items()}
        digest = hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:16]
        sources = sorted({r.label for r, _ in self._entries.values()})
        return {"format": "layer stack", "sources": sources, "mapping_sha256": digest}


def stack(
    label: str,
    slices: list[tuple[CheckpointReader, int, int]],
    first: CheckpointReader,
    last: CheckpointReader,
) -> StackedReader:
    """Layers ``start … stop − 1`` of each ``(reader, start, stop)`` in turn, renumbered from 0;
    tensors outside layers from ``first`` (before the layers) or ``last`` (after them)."""
    entries: dict[str, tuple[CheckpointReader, str]] = {}
    keys_first = first.keys()
    for reader in {id(r): r for r in [first, last] + [s[0] for s in slices]}.values():
        stacks = layer_stacks(reader.keys())
        if len(stacks) > 1:
            raise RecipeError(
                f"{reader.label} has several stacks of layers ({', '.join(sorted(stacks))}): layer "
                "ranges over such models (e.g. a vision tower beside a language model) are not supported"
            )
    for name in keys_first:
        if layer_of(name) is None and _BEFORE.search(name):
            entries[name] = (first, name)
    out_layer = 0
    for k, (reader, start, stop) in enumerate(slices):
        keys = reader.keys()
        n = count_layers(keys)
        if stop > n:
            raise RecipeError(
                f"slices[{k}]: layer_range [{start}, {stop}) is out of bounds: {reader.label} has {n} layers"
            )
        by_layer: dict[int, list[tuple[str, str]]] = {}
        for name in keys:
            parsed = layer_of(name)
            if parsed is not None:
                by_layer.setdefault(parsed[1], []).append((parsed[0], name))
        for i in range(start, stop):
            for pattern, name in by_layer.get(i, []):
                entries[pattern.format(out_layer)] = (reader, name)
            out_layer += 1
    for name in last.keys():
        if layer_of(name) is None and not _BEFORE.search(name):
            entries[name] = (last, name)
    config = first.folder / "config.json" if first.folder is not None else None
    updates: dict[str, Any] = {}
    if config is not None and config.is_file():
        cfg = json.loads(config.read_text())
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                updates[key] = out_layer
        if isinstance(cfg.get("layer_types"), list):
            # per-layer kinds (sliding or full attention): those of the layers taken
            types = []
            for reader, start, stop in slices:
                path = reader.folder / "config.json" if reader.folder is not None else None
                src = json.loads(path.read_text()).get("layer_types") if path and path.is_file() else None
                types += list(src[start:stop]) if isinstance(src, list) and len(src) >= stop else []
            if len(types) == out_layer:
                updates["layer_types"] = types
    return StackedReader(label, entries, first.folder, updates)

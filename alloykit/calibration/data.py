"""Calibration data: samples read from a text or JSON Lines file, picked, tokenised into batches;
and the Hugging Face model (with its tokenizer) that the statistics are computed on."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from alloykit.errors import CheckpointError, MissingDependencyError
from alloykit.io.paths import describe_os_error

if TYPE_CHECKING:
    from alloykit.calibration.lazy import StreamedWeights

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def read_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Samples as ``{"text": ..., "label": ...?}``. A ``.jsonl`` file holds one JSON object per line
    (``text`` and optional ``label``) or one JSON string; a ``.json`` file a list of those; any
    other file one sample per non-empty line."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder; give a text or JSON Lines file of samples") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text; give a text or JSON Lines file of samples") from None
    except OSError as e:
        raise CheckpointError(describe_os_error(e, path)) from None
    if path.suffix == ".jsonl":
        items = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}:{i}: not a JSON value ({e})") from None
    elif path.suffix == ".json":
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise CheckpointError(f"{path}: expected a JSON list of samples")
    else:
        items = [line for line in raw.splitlines() if line.strip()]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"text": item})
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            out.append({k: item[k] for k in ("text", "label") if k in item})
        else:
            raise CheckpointError(f"{path}: sample {i} is neither a string nor an object with a 'text' field")
    if not out:
        raise CheckpointError(f"{path}: holds no samples")
    return out


def pick(samples: Sequence[Any], n: int | None, seed: int = 0) -> list[Any]:
    """``n`` samples drawn without replacement with a seeded generator (all when fewer)."""
    if n is None or n >= len(samples):
        return list(samples)
    if n < 1:
        raise CheckpointError(f"samples = {n}: give at least 1")
    return random.Random(seed).sample(list(samples), n)


def tokenize(
    tokenizer: Any, samples: Sequence[Mapping[str, Any]], batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Padded batches with ``attention_mask`` (padding rows are dropped by the statistics)."""
    batches = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        enc = tokenizer([c["text"] for c in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        batch = dict(enc)
        if all("label" in c for c in chunk):
            batch["labels"] = torch.tensor([int(c["label"]) for c in chunk])
        batches.append(batch)
    return batches


def data_hash(items: Any) -> str:
    """A digest of the calibration data as given to the model (texts, or batch tensors)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous().cpu()
            h.update(f"T{t.dtype}{list(t.shape)}".encode())
            h.update(xxhash.xxh3_128_digest(t.reshape(-1).view(torch.uint8).numpy().tobytes()))
        elif isinstance(x, Mapping):
            for k in sorted(x):
                h.update(f"K{k}".encode())
                feed(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"V{json.dumps(x, default=str)}".encode())

    feed(items)
    return h.hexdigest()


def model_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and xxh3-128 of its bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest = xxhash.xxh3_128_hexdigest(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0{digest}\n".encode())
    return h.hexdigest()


def tokenizer_fingerprint(folder: str | os.PathLike | None) -> str | None:
    """sha256 of the tokenizer files in a model folder (None when it has none)."""
    if folder is None:
        return None
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        p = Path(folder) / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest() if found else None


def load_hf_model(
    folder: str | os.PathLike, stream: bool = False
) -> tuple[torch.nn.Module, Any, Callable[[str], str], StreamedWeights | None]:
    """The model class named in ``config.json`` (so parameter names match the checkpoint), in
    float32 and eval mode, its tokenizer, a map from module parameter names to checkpoint
    tensor names (for the few that differ, e.g. a prefix), and with ``stream`` the
    :class:`~alloykit.calibration.lazy.StreamedWeights` that give each module its weights from
    the checkpoint only while it runs (the model then holds none; else None). Never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError:
        raise MissingDependencyError(
            "calibrating a Hugging Face folder needs transformers: pip install 'alloykit[hf]'"
        ) from None
    from alloykit.calibration.lazy import StreamedWeights, parameters_on_meta
    from alloykit.io import open_checkpoint

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read config.json as a transformers model ({e})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or AutoModel
    try:
        if stream:
            with parameters_on_meta():
                model = cls.from_config(config) if cls is AutoModel else cls(config)
            model.tie_weights()
        else:
            model = cls.from_pretrained(folder, local_files_only=True).float()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load it with transformers ({e})") from None
    model.eval()
    reader = open_checkpoint(folder)
    rename = name_map(list(model.state_dict()), set(reader.keys()))
    weights = StreamedWeights(model, reader, rename) if stream else None
    return model, tokenizer, rename, weights


def name_map(module_names: Sequence[str], checkpoint_keys: set[str]) -> Callable[[str], str]:
    """Module parameter name → checkpoint tensor name: itself when the checkpoint has it, else the
    unique checkpoint key that ends with it (or that it ends with), else itself."""
    mapping: dict[str, str] = {}
    for n in module_names:
        if n in checkpoint_keys:
            continue
        hits = [k for k in checkpoint_keys if k.endswith("." + n) or n.endswith("." + k)]
        if len(hits) == 1:
            mapping[n] = hits[0]
    return lambda n: mapping.get(n, n)


class FolderModel:
    """How a Ray task gets a Hugging Face model: loaded from ``folder`` (a path every node sees)
    in the task, once per worker process, and checked against the driver's ``fingerprint`` (a node
    that sees other files at that path is an error naming it)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder = str(folder)
        self.fingerprint = fingerprint
        self._module: torch.nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "fingerprint": self.fingerprint, "_module": None}

    def module(self) -> torch.nn.Module:
        if self._module is None:
            module, _, _, _ = load_hf_model(self.folder)
            if model_fingerprint(module.state_dict()) != self.fingerprint:
                import socket

                raise CheckpointError(
                    f"{self.folder} on node {socket.gethostname()} holds other weights than the driver "
                    "read there: every node must see the same files at the same path"
                )
            self._module = module
        return self._module

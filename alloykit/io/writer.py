"""Atomic, streaming writer of sharded safetensors folders that ``from_pretrained`` loads.

The layout of every shard (which tensor, at which offset) is fixed before the first tensor is
computed, because the plan knows every output's shape and dtype. Each shard's header is written
first and each tensor's bytes go straight to their offset as soon as they exist: nothing is held
back to "fill a shard", so memory stays bounded by the tensors in flight, and the result is the
same bytes whatever order the workers finish in.

Everything is written into a hidden sibling folder and renamed into place by :meth:`commit`; an
exception or Ctrl-C removes the temporary folder, so no half-written model ever looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from alloykit.errors import OutputExistsError
from alloykit.io.readers import DTYPE_TO_SAFETENSORS, TensorMeta

INDEX_NAME = "model.safetensors.index.json"
# Files copied from a model folder next to the weights, when present.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def parse_size(text: str | int) -> int:
    """``"5GB"`` → bytes (decimal units, like Hugging Face's ``max_shard_size``; ``GiB`` binary)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    for unit, factor in units.items():  # noqa: B007 (used after the loop)
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}; expected e.g. 5GB, 500MB, 2GiB") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * factor)


@dataclass(frozen=True)
class _Slot:
    file: str
    offset: int  # absolute byte offset in the file
    meta: TensorMeta


def plan_shards(metas: list[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    """Greedy packing in plan order: a new shard starts when the next tensor would overflow."""
    shards: list[list[TensorMeta]] = [[]]
    used = 0
    for m in metas:
        if shards[-1] and used + m.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(m)
        used += m.nbytes
    return shards


def _header(tensors: list[TensorMeta], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    entries: dict[str, object] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    pos = 0
    for m in tensors:
        entries[m.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[m.dtype],
            "shape": list(m.shape),
            "data_offsets": [pos, pos + m.nbytes],
        }
        offsets[m.name] = pos
        pos += m.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw, offsets


class StreamingWriter:
    """Writes a planned set of tensors into ``out_dir`` atomically. Use as a context manager."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensors: list[TensorMeta],
        max_shard_bytes: int = 5 * 10**9,
        force: bool = False,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.force = force
        if self.out_dir.exists() and not force:
            raise OutputExistsError(
                f"output folder {self.out_dir} exists; choose another or pass force=True (--force)"
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.alloykit-tmp-{uuid.uuid4().hex[:8]}"
        self.tmp_dir.mkdir()
        self._lock = threading.Lock()
        self._written: dict[str, int] = {}  # elements written per tensor
        self._fds: dict[str, int] = {}
        self._slots: dict[str, _Slot] = {}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = sum(m.nbytes for m in tensors)
        shards = plan_shards(tensors, max_shard_bytes)
        meta = {"format": "pt", **(metadata or {})}
        for i, shard in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            )
            # Larger items first keeps every tensor aligned to its item size, like safetensors does.
            ordered = sorted(shard, key=lambda m: -m.dtype.itemsize)
            head, offsets = _header(ordered, meta)
            fd = os.open(self.tmp_dir / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + sum(m.nbytes for m in shard))
            self._fds[fname] = fd
            for m in ordered:
                self._slots[m.name] = _Slot(fname, len(head) + offsets[m.name], m)
                self.weight_map[m.name] = fname
        self.n_shards = len(shards)
        self._committed = False

    # -- tensors -----------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor, start: int | None = None) -> None:
        """Write one planned tensor (any thread), or with ``start`` a slice of its flattened
        elements beginning there. Shape (whole writes) and dtype must match the plan."""
        slot = self._slots[name]
        meta = slot.meta
        whole = start is None
        start = start or 0
        if (
            tensor.dtype != meta.dtype
            or (whole and tuple(tensor.shape) != meta.shape)
            or (start + tensor.numel() > meta.numel)
        ):
            raise RuntimeError(
                f"tensor {name!r}: got {tensor.dtype}{list(tensor.shape)}"
                f"{'' if whole else f' at element {start}'}, planned {meta.dtype}{list(meta.shape)}"
            )
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            view = memoryview(data)
            base = slot.offset + start * meta.dtype.itemsize
            done = 0
            while done < len(view):
                done += os.pwrite(self._fds[slot.file], view[done:], base + done)
        with self._lock:
            self._written[name] = self._written.get(name, 0) + tensor.numel()

    # -- companions --------------------------------------------------------------------------
    def write_text(self, relative: str, text: str) -> None:
        (self.tmp_dir / relative).write_text(text)

    def copy_companions(self, folder: Path | None, out_dtype: torch.dtype | None = None) -> list[str]:
        """Copy config/tokenizer/generation files from ``folder``; record the output dtype."""
        copied: list[str] = []
        if folder is None:
            return copied
        for name in COMPANION_FILES:
            src = Path(folder) / name
            if not src.is_file():
                continue
            if name == "config.json" and out_dtype is not None:
                cfg = json.loads(src.read_text())
                label = str(out_dtype).removeprefix("torch.")
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = label
                (self.tmp_dir / name).write_text(json.dumps(cfg, indent=2) + "\n")
            else:
                shutil.copy2(src, self.tmp_dir / name)
            copied.append(name)
        return copied

    # -- end ---------------------------------------------------------------------------------
    def commit(self) -> Path:
        missing = {n for n, s in self._slots.items() if self._written.get(n, -1) < s.meta.numel}
        if missing:
            raise RuntimeError(
                f"refusing to commit: {len(missing)} planned tensors were not "
                f"written, e.g. {sorted(missing)[:3]}"
            )
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if self.n_shards > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        old = None
        if self.out_dir.exists():
            if not self.force:
                raise OutputExistsError(f"output folder {self.out_dir} appeared during the merge")
            old = self.out_dir.parent / f".{self.out_dir.name}.alloykit-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out_dir

    def abort(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

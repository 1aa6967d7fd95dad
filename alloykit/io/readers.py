"""Lazy checkpoint readers: names, shapes and dtypes without reading data; one tensor at a time.

Every reader answers the same four questions (:class:`CheckpointReader`): which tensors exist,
what shape and dtype each has, the bytes of one tensor, and a short fingerprint for provenance.

Safetensors files are read with ``os.pread`` at the offsets of their header rather than through
``safe_open``'s memory map: pages of a memory map stay in the process's resident set while the
file is open, so a streaming merge of a 7 B model would "use" 14 GB of RSS it never needs. The
header is parsed and checked here (dtype known, offsets inside the file, sizes consistent), which
also turns corrupt and truncated files into clear errors before any merging starts.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from alloykit.errors import CheckpointError
from alloykit.io.paths import describe_os_error

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader(Protocol):
    """What the engine needs from any checkpoint."""

    label: str
    folder: Path | None  # where config/tokenizer files live, if any

    def keys(self) -> list[str]: ...
    def meta(self, name: str) -> TensorMeta: ...
    def read(self, name: str) -> torch.Tensor: ...
    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        """Elements ``start .. start+length`` of the flattened tensor, as a 1-D tensor."""
        ...

    def fingerprint(self) -> dict: ...


# --------------------------------------------------------------------------- safetensors


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated at open, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(
                        f"{self.path}: not a safetensors file (only {size} bytes, header needs 8)"
                    )
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt safetensors header "
                        f"(declares {n} header bytes, file has {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(describe_os_error(e, self.path)) from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.size = size
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[TensorMeta, int, int]] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has an unknown dtype or a malformed entry ({e})"
                ) from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed entry") from None
            meta = TensorMeta(name, shape, dtype)
            if end - begin != meta.nbytes or begin < 0:
                raise CheckpointError(
                    f"{self.path}: corrupt entry for {name!r}: offsets {begin}..{end} do not hold "
                    f"{meta.nbytes} bytes of {info['dtype']}{list(shape)}"
                )
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} needs bytes up to "
                    f"{self._data_start + end}, the file has {size}"
                )
            self._entries[name] = (meta, begin, end)
        self._fd: int | None = None
        self._open_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # sent to other processes (the Ray executor): each opens its own descriptor
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_open_lock")}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._fd = None
        self._open_lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        meta = self._entries[name][0]
        return self.read_range(name, 0, meta.numel).reshape(meta.shape)

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        meta, begin, _ = self._entries[name]
        item = meta.dtype.itemsize
        begin, end = begin + start * item, begin + (start + length) * item
        buf = bytearray(end - begin)
        view = memoryview(buf)
        done = 0
        try:
            if self._fd is None:
                with self._open_lock:  # workers share one descriptor; pread keeps no file offset
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
            while done < len(buf):
                got = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: file ended while reading {name!r} (truncated?)")
                done += got
        except OSError as e:
            raise CheckpointError(describe_os_error(e, self.path) + f" (while reading {name!r})") from None
        if not buf:
            return torch.empty(0, dtype=meta.dtype)
        return torch.frombuffer(buf, dtype=meta.dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class SafetensorsReader:
    """A single ``.safetensors`` file or a sharded set described by ``*.safetensors.index.json``."""

    def __init__(self, files: list[Path], label: str, folder: Path | None):
        self.label = label
        self.folder = folder
        self._files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for k in f.keys():
                if k in self._where:
                    raise CheckpointError(
                        f"{label}: tensor {k!r} appears in both {self._where[k].path.name} and {f.path.name}"
                    )
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> TensorMeta:
        return self._where[name].meta(name)

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        return self._where[name].read_range(name, start, length)

    def fingerprint(self) -> dict:
        # Names and sizes only: the engine adds a digest of the tensors' bytes as it reads them.
        return {
            "format": "safetensors",
            "files": [{"name": f.path.name, "bytes": f.size} for f in self._files],
        }


# --------------------------------------------------------------------------- pickles


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    # Only the zip format (torch >= 1.6) can be memory-mapped; legacy files are read whole.
    mmap = zipfile.is_zipfile(path) if path.exists() else False
    try:
        obj = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: this pickle needs code execution to load (weights_only=True "
            f"rejected it: {first}). Convert it to safetensors with code you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({e})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}; expected a flat state dict")
    return dict(obj)


class TensorDictReader:
    """Tensors already in memory (a state dict, an ``nn.Module``) or memory-mapped pickles."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        label: str,
        folder: Path | None = None,
        fingerprint: dict | None = None,
    ):
        self.label = label
        self.folder = folder
        self._t = dict(tensors)
        self._fp = fingerprint or {"format": "state_dict", "tensors": len(self._t)}

    def keys(self) -> list[str]:
        return list(self._t)

    def meta(self, name: str) -> TensorMeta:
        t = self._t[name]
        return TensorMeta(name, tuple(t.shape), t.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._t[name]

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        return self._t[name].reshape(-1)[start : start + length]

    def fingerprint(self) -> dict:
        return self._fp


def _pickle_reader(files: list[Path], label: str, folder: Path | None) -> TensorDictReader:
    tensors: dict[str, torch.Tensor] = {}
    for p in files:
        tensors.update(_load_pickle(p))
    fp = {
        "format": "pytorch",
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in files],
    }
    return TensorDictReader(tensors, label, folder, fp)


# --------------------------------------------------------------------------- entry point


def _index_files(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text())
        files = sorted(set(data["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: malformed index file ({e})") from None
    missing = [f for f in files if not (index.parent / f).exists()]
    if missing:
        raise CheckpointError(f"{index}: shards listed in the index are missing: {missing}")
    return [index.parent / f for f in files]


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _refuse_adapter(path: Path) -> None:
    """A PEFT adapter folder (``adapter_config.json``) holds lora_A/lora_B factors, not a model:
    read as one it would write factors into the output. Adapters are models through
    :class:`alloykit.io.lora.LoraReader`, on a base."""
    folder = path if path.is_dir() else path.parent
    if not (folder / "adapter_config.json").is_file():
        return
    if path.is_file() and not path.name.startswith("adapter_model"):
        return  # a model file that merely sits beside an adapter
    raise CheckpointError(
        f"{path}: this is a PEFT adapter (adapter_config.json with LoRA factors), not a whole "
        "model; it is one only on its base: give it as a model of a merge that has a base model "
        "(or as 'base_path+adapter_path')."
    )


def open_checkpoint(source: object, label: str | None = None) -> CheckpointReader:
    """Open a checkpoint lazily.

    ``source`` may be a Hugging Face model folder (``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, ``pytorch_model.bin`` with or without index, or a single
    ``*.safetensors`` file in it), a ``.safetensors`` file, a ``.pt``/``.bin`` state dict file, a
    mapping of names to tensors, or an ``nn.Module`` (its ``state_dict()``).
    """
    if isinstance(source, torch.nn.Module):
        return TensorDictReader(source.state_dict(), label or type(source).__name__)
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{label or 'state dict'}: entries that are not tensors: {bad[:5]}")
        return TensorDictReader(source, label or "state_dict")
    if callable(getattr(source, "read_range", None)) and callable(getattr(source, "meta", None)):
        return source  # already a reader (e.g. a layer stack, alloykit.io.stacked)
    if not isinstance(source, str | os.PathLike):
        raise CheckpointError(
            f"cannot read a checkpoint from {type(source).__name__}; expected a path, a state "
            "dict or an nn.Module"
        )
    path = Path(source)
    label = label or str(source)
    try:
        return _open_path(path, label)
    except OSError as e:  # permission denied, symlink loop, I/O error: a message, not a traceback
        raise CheckpointError(describe_os_error(e, e.filename or path)) from None


def _open_path(path: Path, label: str) -> CheckpointReader:
    path.stat()  # raises for a symlink loop or a path we may not read (is_file() would say False)
    _refuse_adapter(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsReader([path], label, path.parent)
        if path.suffix in _PICKLE_SUFFIXES:
            return _pickle_reader([path], label, path.parent)
        if path.name.endswith(".index.json"):
            files = _index_files(path)
            if path.name.endswith(".safetensors.index.json"):
                return SafetensorsReader(files, label, path.parent)
            return _pickle_reader(files, label, path.parent)
        raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: neither a regular file nor a folder")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            return open_checkpoint(path / index_name, label)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return open_checkpoint(path / name, label)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsReader(singles, label, path)
    raise CheckpointError(
        f"{path}: no checkpoint found (looked for model.safetensors[.index.json], "
        f"pytorch_model.bin[.index.json] or a single *.safetensors file)"
    )

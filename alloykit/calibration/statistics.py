"""Per-parameter statistics that data-aware methods (ESM, RegMean, Fisher) read, in memory or in
a safetensors file, read lazily one parameter at a time.

One entry per weight tensor, keyed by the parameter's name in the checkpoint:

* ``{"gram": G, "tokens": N}``: the uncentred input Gram matrix G = XᵀX (d_in × d_in) of the
  layer that owns the weight, summed over N input rows (tokens, padding excluded);
* ``{"inputs": X, "tokens": N}``: the rows X (N × d_in) themselves, kept instead of G while
  N ≤ d_in (smaller, and exact); methods form XᵀX in float64 when they need it;
* ``{"fisher": F, "examples": n}``: the diagonal Fisher information of the parameter (its shape),
  averaged over n labelled examples.

Optional keys: ``transposed`` (the weight is stored d_in × d_out, as GPT-2's ``Conv1D``) and
``signature`` ((Σw, Σw²) of the weight the statistics were computed with, so that statistics of
another model are caught at merge time). Layers that read the same input (q/k/v, gate/up) share one
Gram in a file. A file carries metadata: the model's fingerprint, the data's hash, samples, tokens.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import CheckpointError, NonFiniteError, OutputError
from alloykit.io.paths import describe_os_error
from alloykit.io.readers import DTYPE_TO_SAFETENSORS, TensorMeta
from alloykit.io.writer import safetensors_header

KINDS = ("gram", "inputs", "fisher")
_META_KEY = "alloykit_statistics"
_VERSION = 1
Entry = dict[str, Any]


def _check_entry(name: str, entry: Mapping[str, Any], where: str) -> None:
    """Shape and count checks that need no tensor data beyond shapes."""
    stats = [k for k in KINDS if k in entry]
    if len(stats) != 1:
        raise CheckpointError(f"{where}: statistics for {name!r} hold {stats or 'none'} of {KINDS}")
    kind = stats[0]
    t = entry[kind]
    count_key = "examples" if kind == "fisher" else "tokens"
    count = entry.get(count_key)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise CheckpointError(
            f"{where}: statistics for {name!r} count {count_key} = {count!r}; expected a positive number "
            "(no data reached this layer?)"
        )
    shape = tuple(t.shape)
    if kind == "gram" and (len(shape) != 2 or shape[0] != shape[1]):
        raise CheckpointError(f"{where}: Gram matrix for {name!r} has shape {list(shape)}; expected square")
    if kind == "inputs" and (len(shape) != 2 or shape[0] != count):
        raise CheckpointError(
            f"{where}: inputs for {name!r} have shape {list(shape)} but tokens = {count}; expected N × d_in"
        )


def check_finite(name: str, entry: Mapping[str, Any], where: str) -> None:
    for kind in KINDS:
        t = entry.get(kind)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{where}: statistics for {name!r} ({kind}) hold NaN or Inf")


def gram_of(entry: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """G = XᵀX of an activation entry (from the Gram, or formed from the stored rows)."""
    if "gram" in entry:
        return entry["gram"].to(dtype)
    x = entry["inputs"].to(dtype)
    return x.T @ x


def input_dim(entry: Mapping[str, Any]) -> int:
    return int(entry["gram"].shape[0] if "gram" in entry else entry["inputs"].shape[1])


class Statistics:
    """Statistics held in memory (what calibration returns; what users may build by hand)."""

    def __init__(self, entries: Mapping[str, Entry] | None = None, meta: Mapping[str, Any] | None = None,
                 label: str = "statistics"):  # fmt: skip
        self.entries: dict[str, Entry] = dict(entries or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self.label = label
        # parameter -> parameter whose tensor it shares (layers reading the same input)
        self.shared: dict[str, str] = {}
        for name, entry in self.entries.items():
            _check_entry(name, entry, label)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], label: str = "statistics") -> Statistics:
        """``{param: {"gram": G, "tokens": N}}``, ``{param: {"inputs": X, "tokens": N}}``,
        ``{param: {"fisher": F, "examples": n}}``, or ``{param: X}`` (raw layer inputs, N × d_in)."""
        entries = {}
        for name, value in data.items():
            if isinstance(value, torch.Tensor):
                if value.dim() != 2:
                    raise CheckpointError(
                        f"{label}: raw inputs for {name!r} must be N × d_in, got shape {list(value.shape)}"
                    )
                value = {"inputs": value, "tokens": int(value.shape[0])}
            elif not isinstance(value, Mapping):
                raise CheckpointError(f"{label}: statistics for {name!r} must be a tensor or a mapping")
            entries[name] = dict(value)
        return cls(entries, label=label)

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> Entry | None:
        """Shapes and counts without data (for planning)."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def nbytes(self, name: str) -> int:
        entry = self.entries.get(name)
        if entry is None:
            return 0
        return sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically: a temporary sibling renamed into place)."""
        with StatisticsWriter(path, len(self.entries)) as writer:
            for name, entry in self.entries.items():
                writer.add(name, entry, self.shared.get(name))
            return writer.commit(self.meta)


class StatisticsWriter:
    """Writes statistics into a safetensors file as they are made: each entry's tensor goes to
    disk when it is added, so a calibration holds only what it is still summing. Atomic: the
    file is a hidden sibling until :meth:`commit` renames it into place; :meth:`abort` (or an
    exception inside ``with``) removes it.

    The header leads the file but is known only at the end: room for it is reserved (the format
    lets a header be padded with spaces); one that outgrows the room (far more metadata than
    ``entries`` suggests) is written into a new file, the data copied after it block by block."""

    _PER_ENTRY = 512  # header bytes reserved per entry (a tensor's line and its parameters' ~300)
    _COPY_BLOCK = 64 << 20

    def __init__(self, path: str | os.PathLike, entries: int = 0):
        self.path = Path(path)
        self.reserve = 8 * ((65536 + self._PER_ENTRY * entries) // 8)
        self.tensors: list[TensorMeta] = []
        self.params: dict[str, dict[str, Any]] = {}
        self.tokens = 0
        self._written: set[str] = set()
        self._tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by commit or abort)
            self._file.seek(self.reserve)
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise OutputError(describe_os_error(e, self.path)) from None

    def add(self, name: str, entry: Mapping[str, Any], source: str | None = None) -> None:
        """One parameter's entry; ``source``: the parameter whose tensor it shares (added before)."""
        _check_entry(name, entry, str(self.path))
        kind = next(k for k in KINDS if k in entry)
        source = source or name
        if source == name:
            tensor = entry[kind].detach().cpu().contiguous()
            if tensor.dtype not in DTYPE_TO_SAFETENSORS:
                raise CheckpointError(
                    f"statistics for {name!r} are {str(tensor.dtype).removeprefix('torch.')}, which a "
                    "safetensors file cannot hold"
                )
            self.tensors.append(TensorMeta(f"{name}.{kind}", tuple(tensor.shape), tensor.dtype))
            try:
                self._file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            except OSError as e:
                self.abort()
                raise OutputError(describe_os_error(e, self.path)) from None
        elif f"{source}.{kind}" not in self._written:
            raise CheckpointError(f"statistics for {name!r} share {source!r}'s {kind}, which was not added")
        self._written.add(f"{name}.{kind}")
        info = {k: v for k, v in entry.items() if k not in KINDS}
        self.params[name] = {"source": source, "stat": kind, **info}
        if kind != "fisher":
            self.tokens = max(self.tokens, int(entry["tokens"]))

    def commit(self, meta: Mapping[str, Any]) -> Path:
        """Write the header (``meta``: the file's metadata besides the entries), rename into place."""
        metadata = {_META_KEY: json.dumps({"version": _VERSION, "params": self.params, **meta}, default=str)}
        try:
            try:
                head, _ = safetensors_header(self.tensors, metadata, size=self.reserve)
                self._file.seek(0)
                self._file.write(head)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except ValueError:  # (the header outgrew its room)
                self._rewrite(metadata)
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(describe_os_error(e, self.path)) from None
        except BaseException:  # (a dtype the format lacks, an interrupt: no temporary left)
            self.abort()
            raise
        return self.path

    def _rewrite(self, metadata: dict[str, str]) -> None:
        head, _ = safetensors_header(self.tensors, metadata)
        self._file.close()
        grown = self._tmp.with_name(self._tmp.name + ".2")
        try:
            with open(self._tmp, "rb") as src, open(grown, "wb") as dst:
                dst.write(head)
                src.seek(self.reserve)
                while block := src.read(self._COPY_BLOCK):
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(grown, self._tmp)
        finally:
            grown.unlink(missing_ok=True)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StatisticsWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self._tmp.exists():
            self.abort()


class StatisticsFile:
    """A statistics safetensors file, validated at open and read one parameter at a time."""

    def __init__(self, path: str | os.PathLike):
        from alloykit.io.readers import SafetensorsFile

        self.path = Path(path)
        self.label = str(path)
        self._file = SafetensorsFile(self.path)
        raw = self._file.metadata.get(_META_KEY)
        if raw is None:
            raise CheckpointError(
                f"{self.path}: not an alloykit statistics file (no {_META_KEY!r} metadata); make one with "
                "`alloykit calibrate`"
            )
        try:
            meta = json.loads(raw)
            params = meta.pop("params")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path}: corrupt statistics metadata ({e})") from None
        self.meta: dict[str, Any] = meta
        self._params: dict[str, dict[str, Any]] = params
        keys = set(self._file.keys())
        for name, info in params.items():
            key = f"{info.get('source')}.{info.get('stat')}"
            if key not in keys:
                raise CheckpointError(f"{self.path}: statistics for {name!r} point to missing tensor {key!r}")
            shaped = {**{k: v for k, v in info.items() if k not in ("source", "stat")},
                      info["stat"]: self._file.meta(key)}  # fmt: skip
            _check_entry(name, {k: (_Shape(v.shape) if k == info["stat"] else v) for k, v in shaped.items()},
                         str(self.path))  # fmt: skip

    def names(self) -> list[str]:
        return list(self._params)

    def info(self, name: str) -> Entry | None:
        info = self._params.get(name)
        if info is None:
            return None
        meta = self._file.meta(f"{info['source']}.{info['stat']}")
        return {**{k: v for k, v in info.items() if k not in ("source", "stat")}, info["stat"]: meta.shape}

    def get(self, name: str) -> Entry | None:
        info = self._params.get(name)
        if info is None:
            return None
        tensor = self._file.read(f"{info['source']}.{info['stat']}")
        entry = {k: v for k, v in info.items() if k not in ("source", "stat")}
        entry[info["stat"]] = tensor
        return entry

    def nbytes(self, name: str) -> int:
        info = self._params.get(name)
        return 0 if info is None else self._file.meta(f"{info['source']}.{info['stat']}").nbytes


class _Shape:
    """A stand-in with a ``shape``, for checking entries before reading their data."""

    def __init__(self, shape: Iterable[int]):
        self.shape = tuple(shape)


StatisticsSource = Statistics | StatisticsFile


def open_statistics(source: Any, label: str | None = None) -> StatisticsSource:
    """A path to a statistics file, a :class:`Statistics`, or a mapping (see
    :meth:`Statistics.from_mapping`)."""
    if isinstance(source, Statistics | StatisticsFile):
        return source
    if isinstance(source, str | os.PathLike):
        return StatisticsFile(source)
    if isinstance(source, Mapping):
        return Statistics.from_mapping(source, label or "statistics")
    raise CheckpointError(
        f"cannot read statistics from {type(source).__name__}; expected a file path, a Statistics or a dict"
    )


def statistics_label(source: Any, model: str) -> str:
    """How messages name a model's statistics: the file, or "statistics of MODEL"."""
    if isinstance(source, StatisticsFile):
        return f"statistics file {source.path} (of {model})"
    return f"statistics of {model}"


def weight_signature(weight: torch.Tensor) -> list[float]:
    """(Σw, Σw²) in float64: tells the weight statistics were computed with from another."""
    w = weight.detach().double()
    return [float(w.sum()), float(w.square().sum())]


def signature_matches(
    expected: Iterable[float], weight: torch.Tensor, computed_in: str | None = None
) -> bool:
    """Whether ``weight`` is the weight the statistics were computed with. The sums are float64
    sums of the same float values (a bf16 checkpoint upcast for calibration gives the same
    values), so only summation order differs: a tight tolerance tells a fine-tune from its base.
    When the merge reads the weight in a narrower dtype than ``computed_in`` (float64 statistics,
    float32 merge), the rounding of that dtype is allowed."""
    rel = 1e-9
    if computed_in is not None:
        wider = getattr(torch, computed_in, None)
        if isinstance(wider, torch.dtype) and weight.dtype.itemsize < wider.itemsize:
            rel = 8 * torch.finfo(weight.dtype).eps
    total, squares = weight_signature(weight)
    exp_total, exp_squares = expected
    scale = math.sqrt(max(squares, 1e-300) * max(weight.numel(), 1))
    return (
        abs(squares - exp_squares) <= rel * max(abs(exp_squares), 1e-300)
        and abs(total - exp_total) <= rel * scale
    )

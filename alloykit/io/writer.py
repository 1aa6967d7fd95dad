"""Atomic, streaming writer of sharded safetensors folders that ``from_pretrained`` loads.

The layout of every shard (which tensor, at which offset) is fixed before the first tensor is
computed, because the plan knows every output's shape and dtype. Each shard's header is written
first and each tensor's bytes go straight to their offset as soon as they exist: nothing is held
back to "fill a shard", so memory stays bounded by the tensors in flight, and the result is the
same bytes whatever order the workers finish in.

Everything is written into a hidden sibling folder and renamed into place by :meth:`commit`; an
exception or Ctrl-C removes the temporary folder, so no half-written model ever looks complete.
Free space is checked against the plan before the first byte; an OS error while writing (disk
full, I/O error) becomes an :class:`OutputError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from alloykit.errors import CheckpointError, OutputError, OutputExistsError
from alloykit.io.paths import describe_os_error
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

# what a tokenizer consists of (the chat template is the tokenizer's too)
TOKENIZER_FILES = frozenset(COMPANION_FILES) - {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
}


def validate_companions(folder: Path | None) -> list[str]:
    """Parse every JSON companion file in ``folder`` now, before any tensor is read, so that a
    malformed ``config.json`` is reported at once and by name. Returns the files present."""
    present: list[str] = []
    if folder is None:
        return present
    for name in COMPANION_FILES:
        src = Path(folder) / name
        if not src.is_file():
            continue
        present.append(name)
        if name.endswith(".json"):
            try:
                data = json.loads(src.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{src}: malformed JSON ({e}); fix or remove the file") from None
            except OSError as e:
                raise CheckpointError(describe_os_error(e, src)) from None
            if name == "config.json" and not isinstance(data, dict):
                raise CheckpointError(f"{src}: expected a JSON object, found {type(data).__name__}")
    return present


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the output is swapped into place, so that a signal
    cannot land between moving the old output aside and moving the new one in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def safetensors_header(
    tensors: list[TensorMeta], metadata: dict[str, str], size: int | None = None
) -> tuple[bytes, dict[str, int]]:
    """The 8-byte length and JSON header of a file holding ``tensors`` back to back, and each
    tensor's offset in the data. ``size``: the header's whole length, 8 bytes included, padded
    with spaces as the format allows (a writer that reserved room before it knew the header);
    a header that does not fit raises ``ValueError``."""
    head, offsets = _header(tensors, metadata)
    if size is None or size == len(head):
        return head, offsets
    if size < len(head) or size % 8:
        raise ValueError(f"a header of {len(head)} bytes does not fit in {size}")
    return struct.pack("<Q", size - 8) + head[8:] + b" " * (size - len(head)), offsets


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


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # pragma: no cover - pwrite reports errors by raising
            raise OSError(5, "short write")
        done += n


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class ShardHandle:
    """Writes planned tensors into the shard files of a :class:`StreamingWriter`'s temporary
    folder from any process that sees it (same machine or shared storage). Writes land at fixed
    offsets, so a job that is retried writes the same bytes again."""

    def __init__(self, folder: Path, slots: dict[str, tuple[str, int, TensorMeta]], out_dir: Path):
        self.folder, self.slots, self.out_dir = Path(folder), slots, out_dir

    def write(self, name: str, tensor: torch.Tensor, start: int | None = None) -> None:
        file, offset, meta = self.slots[name]
        start = start or 0
        if tensor.dtype != meta.dtype or start + tensor.numel() > meta.numel:
            raise RuntimeError(
                f"tensor {name!r}: got {tensor.dtype}{list(tensor.shape)}, planned {meta.dtype}"
            )
        if not tensor.numel():
            return
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            fd = os.open(self.folder / file, os.O_WRONLY)
            try:
                _pwrite_all(fd, memoryview(data), offset + start * meta.dtype.itemsize)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(
                describe_os_error(e, self.out_dir / file) + f" (while writing {name!r})"
            ) from None


class StreamingWriter:
    """Writes a planned set of tensors into ``out_dir`` atomically. Use as a context manager."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensors: list[TensorMeta],
        max_shard_bytes: int = 5 * 10**9,
        force: bool = False,
        metadata: dict[str, str] | None = None,
        stem: str = "model",
    ):
        self.out_dir = Path(out_dir)
        self.stem = stem  # file names: model.safetensors, or adapter_model.safetensors for PEFT
        self.force = force
        self._committed = False
        self._aborted = False
        self._writing = 0  # writes in flight (abort closes the files only when none is)
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        if self.out_dir.exists() and not force:
            raise OutputExistsError(
                f"output folder {self.out_dir} exists; choose another or pass force=True (--force)"
            )
        self.total_bytes = sum(m.nbytes for m in tensors)
        parent = self.out_dir.parent
        # Folders made for the output are removed again if the merge does not complete.
        self._made: list[Path] = []
        missing = parent
        while not missing.exists() and missing != missing.parent:
            self._made.append(missing)
            missing = missing.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(parent).free
        except OSError as e:
            raise OutputError(describe_os_error(e, parent)) from None
        if free < self.total_bytes:
            raise OutputError(
                f"{parent}: not enough free space for the output: it needs {_size(self.total_bytes)}, "
                f"{_size(free)} is free. Free space or choose another output folder."
            )
        self.tmp_dir = parent / f".{self.out_dir.name}.alloykit-tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.tmp_dir.mkdir()
            self._create_shards(tensors, max_shard_bytes, metadata)
        except OSError as e:
            self.abort()
            raise OutputError(describe_os_error(e, e.filename or self.tmp_dir)) from None

    def _create_shards(
        self, tensors: list[TensorMeta], max_shard_bytes: int, metadata: dict[str, str] | None
    ) -> None:
        self._written: dict[str, int] = {}  # elements written per tensor
        self._slots: dict[str, _Slot] = {}
        self.weight_map: dict[str, str] = {}
        shards = plan_shards(tensors, max_shard_bytes)
        meta = {"format": "pt", **(metadata or {})}
        for i, shard in enumerate(shards):
            fname = (
                f"{self.stem}.safetensors"
                if len(shards) == 1
                else (f"{self.stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            )
            # Larger items first keeps every tensor aligned to its item size, like safetensors does.
            ordered = sorted(shard, key=lambda m: -m.dtype.itemsize)
            head, offsets = _header(ordered, meta)
            fd = os.open(self.tmp_dir / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[fname] = fd
            _pwrite_all(fd, memoryview(head), 0)
            os.ftruncate(fd, len(head) + sum(m.nbytes for m in shard))
            for m in ordered:
                self._slots[m.name] = _Slot(fname, len(head) + offsets[m.name], m)
                self.weight_map[m.name] = fname
        self.n_shards = len(shards)

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
        with self._lock:
            if self._aborted:
                return  # a job that finished after the merge was stopped: drop its result
            self._writing += 1
            fd = self._fds[slot.file]
        try:
            if tensor.numel():
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                try:
                    _pwrite_all(fd, memoryview(data), slot.offset + start * meta.dtype.itemsize)
                except OSError as e:
                    raise OutputError(
                        describe_os_error(e, self.out_dir / slot.file) + f" (while writing {name!r})"
                    ) from None
            with self._lock:
                self._written[name] = self._written.get(name, 0) + tensor.numel()
        finally:
            with self._lock:
                self._writing -= 1
                if self._aborted and self._writing == 0:
                    self._close_files()

    def patch(self, name: str, start: int | None, index: torch.Tensor, values: torch.Tensor) -> None:
        """Rewrite a few entries of a tensor already written: the flat positions ``index`` of the
        piece written at ``start`` get ``values``. Read-modify-write of the span they cover."""
        if not index.numel():
            return
        slot = self._slots[name]
        meta = slot.meta
        if values.dtype != meta.dtype or values.numel() != index.numel():
            raise RuntimeError(
                f"patch of {name!r}: got {values.dtype}[{values.numel()}], planned {meta.dtype}"
            )
        positions = index.cpu() + (start or 0)
        low, high = int(positions.min()), int(positions.max()) + 1
        size = meta.dtype.itemsize
        fd = self._fds[slot.file]
        where = slot.offset + low * size
        try:
            span = torch.frombuffer(bytearray(os.pread(fd, (high - low) * size, where)), dtype=meta.dtype)
            span[positions - low] = values.cpu()
            _pwrite_all(fd, memoryview(span.view(torch.uint8).numpy()), where)
        except OSError as e:
            raise OutputError(
                describe_os_error(e, self.out_dir / slot.file) + f" (while writing {name!r})"
            ) from None

    def remote(self) -> ShardHandle:
        """A picklable handle through which jobs in other processes write their tensors into
        this output's shards, at the planned offsets (``record`` then counts them here)."""
        return ShardHandle(
            self.tmp_dir, {n: (s.file, s.offset, s.meta) for n, s in self._slots.items()}, self.out_dir
        )

    def record(self, name: str, elements: int) -> None:
        """Count elements of ``name`` that a job wrote through the remote handle."""
        with self._lock:
            self._written[name] = self._written.get(name, 0) + elements

    # -- companions --------------------------------------------------------------------------
    def write_text(self, relative: str, text: str) -> None:
        try:
            (self.tmp_dir / relative).write_text(text)
        except OSError as e:
            raise OutputError(describe_os_error(e, self.out_dir / relative)) from None

    def update_json(self, relative: str, updates: dict) -> None:
        """Set keys of a JSON file already in the output (e.g. config.json's number of layers)."""
        path = self.tmp_dir / relative
        try:
            data = json.loads(path.read_text())
            data.update(updates)
            path.write_text(json.dumps(data, indent=2) + "\n")
        except OSError as e:
            raise OutputError(describe_os_error(e, self.out_dir / relative)) from None

    def copy_companions(
        self, folder: Path | None, out_dtype: torch.dtype | None = None, tokenizer: bool = True
    ) -> list[str]:
        """Copy config/tokenizer/generation files from ``folder`` (``tokenizer=False``: not the
        tokenizer's, when another tokenizer is written); record the output dtype."""
        if folder is None:
            return []
        try:
            return self._copy_companions(Path(folder), out_dtype, tokenizer)
        except OSError as e:
            raise OutputError(describe_os_error(e, e.filename or self.tmp_dir)) from None

    def _copy_companions(self, folder: Path, out_dtype: torch.dtype | None, tokenizer: bool) -> list[str]:
        copied: list[str] = []
        for name in COMPANION_FILES:
            if not tokenizer and name in TOKENIZER_FILES:
                continue
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
        try:
            for fd in self._fds.values():
                os.fsync(fd)
            self._close_files()
            if self.n_shards > 1:
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
                (self.tmp_dir / f"{self.stem}.safetensors.index.json").write_text(
                    json.dumps(index, indent=2) + "\n"
                )
            with _signals_held():
                old = None
                if self.out_dir.exists():
                    if not self.force:
                        raise OutputExistsError(f"output folder {self.out_dir} appeared during the merge")
                    old = self.out_dir.parent / f".{self.out_dir.name}.alloykit-old-{uuid.uuid4().hex[:8]}"
                    os.replace(self.out_dir, old)
                os.replace(self.tmp_dir, self.out_dir)
                self._committed = True
        except OSError as e:
            raise OutputError(describe_os_error(e, e.filename or self.out_dir)) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir

    def _close_files(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def abort(self) -> None:
        """Remove the temporary folder. Files still being written by jobs that have not seen
        the stop yet are closed by the last of them (their writes land in unlinked files)."""
        with self._lock:
            self._aborted = True
            if self._writing == 0:
                self._close_files()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for folder in self._made:  # innermost first; stops at the first one not empty
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

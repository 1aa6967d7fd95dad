"""Running a plan: optional reduction passes, then one job per output tensor into a sink."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import pickle
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import xxhash

from alloykit.engine.devices import CPU, is_out_of_memory, on_device, to_device
from alloykit.engine.executor import DEFAULT_THREADS, in_plan_order, intra_op_threads, make_executor
from alloykit.engine.memory import PeakRSS, tune_allocator
from alloykit.engine.plan import MergePlan, TensorJob
from alloykit.errors import DeviceMemoryError, MismatchError, NonFiniteError
from alloykit.methods.base import Inputs, TensorContext


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor, start: int | None = None) -> None: ...
    def patch(self, name: str, start: int | None, index: torch.Tensor, values: torch.Tensor) -> None: ...


class DictSink:
    """Collects the merged tensors in memory (the in-memory API)."""

    def __init__(self, outputs: list | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._meta = {m.name: m for m in outputs or []}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, start: int | None = None) -> None:
        if start is None:
            self.tensors[name] = tensor
            return
        meta = self._meta[name]
        with self._lock:
            if name not in self.tensors:
                self.tensors[name] = torch.empty(meta.shape, dtype=meta.dtype)
        self.tensors[name].view(-1)[start : start + tensor.numel()] = tensor

    def patch(self, name: str, start: int | None, index: torch.Tensor, values: torch.Tensor) -> None:
        """Rewrite the entries at flat positions ``index`` of the piece written at ``start``."""
        self.tensors[name].view(-1)[(start or 0) + index] = values


@dataclass
class MergeReport:
    tensors: int = 0
    merged: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    reduction_passes: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    baseline_rss: int = 0
    workers: int = 1
    threads: int = DEFAULT_THREADS  # intra-op threads per job
    copied: int = 0  # tensors copied from one input rather than merged
    warnings: list[str] = field(default_factory=list)  # found while merging (the plan has its own)
    relative_delta_norm: dict[str, float] = field(default_factory=dict)
    # Per input (models in order, then the base): sha256 of the bytes the merge read.
    digests: list[dict[str, Any]] = field(default_factory=list)
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # where merged jobs computed
    executor: str = "thread"
    nodes: dict[str, int] = field(default_factory=dict)  # Ray: jobs per node (of every pass)
    worker_peak_rss: dict[str, int] = field(default_factory=dict)  # Ray: largest worker peak per node

    def as_dict(self) -> dict[str, Any]:
        """Everything but the digests (the provenance lists those with each input)."""
        return {k: v for k, v in self.__dict__.items() if k != "digests"}


class InputDigests:
    """A content digest of each input, from the bytes the merge reads anyway.

    Every slice a job reads is hashed with xxh3-128 (a 128-bit non-cryptographic hash at
    ~20 GB/s; sha256 ran at 1.7 GB/s here and made a linear merge 37 % slower) as it comes
    from the reader, before any cast; an input's digest is the sha256 of its sorted ``name,
    start, length, dtype, slice hash`` lines. It identifies the weights whatever order the
    workers ran in; it depends on the plan's slicing (``chunk_elements``, fixed by default),
    not on the files' layout (shards, header order)."""

    ALGORITHM = "sha256 over per-slice xxh3_128"

    def __init__(self, n_inputs: int):
        self._parts: list[dict[tuple[str, int], tuple[int, str, str]]] = [{} for _ in range(n_inputs)]
        self._lock = threading.Lock()

    def add(self, index: int, job: TensorJob, raw: torch.Tensor) -> None:
        self.put(*slice_digest(index, job, raw))

    def put(self, index: int, key: tuple[str, int], value: tuple[int, str, str]) -> None:
        with self._lock:
            self._parts[index][key] = value

    def combined(self) -> list[dict[str, Any]]:
        out = []
        for parts in self._parts:
            h = hashlib.sha256()
            size = 0
            for (name, start), (numel, dtype, digest) in sorted(parts.items()):
                h.update(f"{name}\0{start}\0{numel}\0{dtype}\0{digest}\n".encode())
                size += numel * getattr(torch, dtype.removeprefix("torch.")).itemsize
            out.append(
                {
                    "digest": h.hexdigest(),
                    "digest_algorithm": self.ALGORITHM,
                    "tensors": len({n for n, _ in parts}),
                    "bytes_hashed": size,
                }
            )
        return out


def slice_digest(
    index: int, job: TensorJob, raw: torch.Tensor
) -> tuple[int, tuple[str, int], tuple[int, str, str]]:
    data = raw.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = xxhash.xxh3_128_hexdigest(memoryview(data))
    return index, (job.name, job.start), (raw.numel(), str(raw.dtype), digest)


class _DigestList(list):
    """One job's slice digests, handed back to the driver with its result."""

    def add(self, index: int, job: TensorJob, raw: torch.Tensor) -> None:
        self.append(slice_digest(index, job, raw))


def _squared_norms(xs: list[torch.Tensor], base: torch.Tensor) -> tuple[list[float], float]:
    """(‖x − base‖² for each x, ‖base‖²), in float32 slices of 2²⁰ elements: a whole-tensor job
    (an embedding under an SVD method) then holds no tensor-sized temporaries for its report."""
    flat_b = base.reshape(-1)
    flats = [x.reshape(-1) for x in xs]
    deltas = [0.0] * len(xs)
    base_sq = 0.0
    step = 1 << 20
    for i in range(0, flat_b.numel(), step):
        b = flat_b[i : i + step].float()
        base_sq += float(b.square().sum())
        for k, x in enumerate(flats):
            deltas[k] += float((x[i : i + step].float() - b).square().sum())
    return deltas, base_sq


def _all_finite(t: torch.Tensor) -> bool:
    # NaN and ±Inf make the sum non-finite; only when it is (or it overflowed) do we look entry
    # by entry.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _read(
    plan: MergePlan,
    index: int,
    job: TensorJob,
    dtype: torch.dtype | None,
    check: bool = True,
    digests: InputDigests | None = None,
) -> torch.Tensor:
    """One input of a job (the whole tensor, or its slice), checked finite, in ``dtype``."""
    spec = plan.spec
    reader = spec.base if index == len(spec.models) else spec.models[index]
    if job.length is None:
        t = reader.read(job.name)
    else:
        t = reader.read_range(job.name, job.start, job.length)
        if job.view is not None:
            t = t.reshape(job.view)  # whole rows, for a row-wise method
    if digests is not None:
        digests.add(index, job, t)
    if dtype is not None and t.is_floating_point() and dtype.itemsize >= t.dtype.itemsize:
        t = t.to(dtype)  # widening first: the check below then runs on the (faster) float32 copy
    if check and spec.check_finite and t.is_floating_point() and not _all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        where = "" if job.length is None else f" (elements {job.start}..{job.start + job.length})"
        raise NonFiniteError(
            f"{reader.label}: tensor {job.name!r}{where} holds {bad} NaN/Inf values; "
            "refusing to merge it (pass check_finite=False / --allow-nonfinite)"
        )
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _inputs(
    plan: MergePlan, job: TensorJob, check: bool = True, digests: InputDigests | None = None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    spec = plan.spec
    dtype = job.compute_dtype
    narrow = job.merge and spec.method.widens_inputs and dtype == torch.float32

    def wanted(index: int) -> torch.dtype | None:
        if not narrow:
            return dtype
        reader = spec.base if index == len(spec.models) else spec.models[index]
        # bfloat16/float16 as stored: the method widens them itself (exactly)
        return None if reader.meta(job.name).dtype in (torch.bfloat16, torch.float16) else dtype

    tensors = [_read(plan, i, job, wanted(i), check, digests) for i in job.sources]
    base = None
    if spec.base is not None:
        base = _read(plan, len(spec.models), job, wanted(len(spec.models)), check, digests)
    return tensors, base


# Step counters that differ between models for an innocent reason (each was trained for its own
# number of steps) and that no forward pass reads: the reference's value is kept, with a note.
COUNTERS = ("num_batches_tracked",)


def _copy(
    plan: MergePlan, job: TensorJob, digests: InputDigests | None, notes: list[str] | None = None
) -> torch.Tensor:
    """A tensor that is not merged: taken from ``job.copy_from``. The other inputs' copies are
    read too, for their digests and because a non-float tensor (positions, masks) that differs
    between models cannot be merged and must not be silently picked (BatchNorm's step counter
    excepted: its reference value is kept, and said so)."""
    chosen = _read(plan, job.copy_from, job, None, digests=digests)
    # copy_from is the base when it holds the tensor (then every source is another holder),
    # else the first source (and the base does not hold it).
    for i in job.sources:
        if i == job.copy_from:
            continue
        other = _read(plan, i, job, None, check=False, digests=digests)
        if not chosen.is_floating_point() and not torch.equal(other, chosen):
            readers = [*plan.spec.models, plan.spec.base]
            if job.name.rsplit(".", 1)[-1] in COUNTERS and notes is not None:
                notes.append(
                    f"step counters ({COUNTERS[0]}) differ between the models; kept "
                    f"{readers[job.copy_from].label}'s (no forward pass reads them)"
                )
                continue
            raise MismatchError(
                f"tensor {job.name!r} ({chosen.dtype}, not a float tensor, so it cannot be merged) "
                f"differs between {readers[job.copy_from].label} and {readers[i].label}; give models "
                "whose non-float tensors agree, or exclude it and fix it in the output by hand"
            )
    return chosen


def _statistics(plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    """Each source model's statistics entry for this tensor (None where it has none), checked
    finite and, where they carry the weight's signature, computed on this very weight."""
    spec = plan.spec
    if spec.statistics is None or spec.method.statistics is None:
        return ()
    from alloykit.calibration.statistics import check_finite, signature_matches, statistics_label

    out = []
    for i, x in zip(job.sources, tensors, strict=True):
        source = spec.statistics[i]
        entry = source.get(job.name)
        if entry is not None:
            where = statistics_label(source, spec.models[i].label)
            check_finite(job.name, entry, where)
            sig = entry.get("signature")
            if sig is not None and not signature_matches(sig, x, entry.get("signature_dtype")):
                raise MismatchError(
                    f"{where}: were computed on another weight for {job.name!r} than this model holds "
                    "(another model, or another checkpoint of it); calibrate this model"
                )
        out.append(entry)
    present = [e is not None for e in out]
    if any(present) and not all(present):
        missing = [spec.models[i].label for i, p in zip(job.sources, present, strict=True) if not p]
        raise MismatchError(
            f"tensor {job.name!r} has statistics for some models but not for {missing}; calibrate every "
            "model with the same layers"
        )
    return tuple(out)


def _context(
    spec: Any,
    job: TensorJob,
    state: Any,
    statistics: tuple[Any, ...] = (),
    notes: list[str] | None = None,
    device: torch.device = CPU,
    deferred: list | None = None,
) -> TensorContext:
    transforms = spec.alignment.entries(job.name) if spec.alignment is not None else ()
    if device != CPU:
        statistics, transforms = to_device((statistics, transforms), device)
    return TensorContext(
        job.name,
        spec.seed,
        state,
        offset=job.start,
        statistics=statistics,
        transforms=transforms,
        notes=notes,
        deferred=deferred,
        result_dtype=job.compute_dtype if spec.method.widens_inputs else None,
    )


class _Waiting:
    """Entries whose value waits for a fused pass's outcome, spooled to an unlinked temporary file
    (beside the output when the sink has a folder): on a large model they may be millions, and
    kept in memory they would also pin the workers' heaps."""

    def __init__(self, folder: Any = None):
        self.folder = folder
        self.file: Any = None
        self.entries = 0

    def add(self, name: str, start: int | None, index: torch.Tensor, alternatives: dict) -> None:
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.folder)
        small = index.numel() == 0 or int(index.max()) < 2**31
        index = index.to(torch.int32 if small else torch.int64).numpy()
        values = {k: (v.dtype, v.contiguous().view(torch.uint8).numpy()) for k, v in alternatives.items()}
        pickle.dump((name, start, index, values), self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.entries += len(index)

    def replay(self) -> Any:
        """(name, start, index, {outcome: values}) in the order they were added; closes the file."""
        if self.file is None:
            return
        with self.file:
            self.file.seek(0)
            while True:
                try:
                    name, start, index, values = pickle.load(self.file)
                except EOFError:
                    return
                alternatives = {k: torch.from_numpy(v).view(dtype) for k, (dtype, v) in values.items()}
                yield name, start, torch.from_numpy(index).long(), alternatives


class _PerDevice:
    """The whole-model state of a pass, copied once to each device that asks for it."""

    def __init__(self, state: Any):
        self.state = state
        self._copies: dict[torch.device, Any] = {CPU: state}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.state}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(d["state"])

    def on(self, device: torch.device) -> Any:
        with self._lock:
            if device not in self._copies:
                self._copies[device] = to_device(self.state, device)
            return self._copies[device]


@dataclass
class JobOutcome:
    """What a merge job hands back to the driver (picklable: jobs may run in other processes)."""

    name: str
    start: int | None
    deltas: list[float] = field(default_factory=list)
    base_sq: float = 0.0
    same: bool = False
    notes: list[str] = field(default_factory=list)
    digests: list[tuple] = field(default_factory=list)
    on_host: int = 0
    written: int | None = None  # elements the job wrote into the output itself
    tensor: torch.Tensor | None = None  # a result the driver writes (when the job cannot)
    # With a fused pass: (partial, flat positions, {outcome: values there in the output dtype}).
    deferred: list[tuple] = field(default_factory=list)


def _hand_over(xs: list[torch.Tensor], tensors: list[torch.Tensor], device: torch.device) -> list:
    """The inputs as the method gets them: on the host, the only references to them (``Inputs``:
    the engine's list is emptied, and the method may drop those it is done with). A job on a
    device gets a plain list and the host copies stay, for a rerun on the host after the device
    runs out of memory."""
    if device != CPU:
        return xs
    tensors.clear()
    return Inputs(xs)


class JobRunner:
    """Runs one job of a plan: reads its inputs, computes on its device, writes or returns the
    result. Picklable, so that an executor may run it in other processes (Ray): what a job
    finds (digests, notes, written elements) is returned, never shared. With ``remote``, jobs
    write through the sink's ``remote()`` handle where it has one (output shards at their
    planned offsets), else return their tensors for the driver to write."""

    def __init__(
        self,
        plan: MergePlan,
        sink: Sink,
        devices: Sequence[torch.device],
        device_fallback: bool,
        digest: bool,
        threads: int,
        remote: bool,
        fused: int | None = None,
    ):
        self.plan = plan
        self.fused = fused  # index of the reduction pass that runs inside the merge pass
        self.devices = list(devices)
        self.device_fallback = device_fallback
        self.digest = digest
        self.threads = threads
        self.remote = remote
        handle = getattr(sink, "remote", None)
        self.sink = (handle() if callable(handle) else None) if remote else sink

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def _run_on(self, job: TensorJob, device: torch.device, compute: Callable[[torch.device], Any]) -> tuple:
        """(result, 1 if it ran on the host after the device ran out of memory else 0)."""
        if device == CPU:
            return compute(CPU), 0
        try:
            with on_device(device):
                return to_device(compute(device), CPU), 0
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if not self.device_fallback:
                raise DeviceMemoryError(
                    f"{device} ran out of memory merging {job.name!r} (its inputs alone take "
                    f"{job.cost / 2**20:.0f} MiB; the method needs a few times that): use fewer --workers, "
                    "--device cpu, or --device-fallback to merge such tensors on the host"
                ) from None
            return compute(CPU), 1

    def _threads(self):
        return intra_op_threads(self.threads) if self.remote else contextlib.nullcontext()

    def reduce(self, index: int, state: _PerDevice, item: tuple[TensorJob, int]) -> tuple[Any, int]:
        job, d = item
        plan, method = self.plan, self.plan.spec.method
        with self._threads():
            tensors, base = _inputs(plan, job, check=index == 0)  # inputs are checked once
            stats = _statistics(plan, job, tensors)

            def compute(device: torch.device) -> Any:
                xs, b = to_device((tensors, base), device)
                xs = _hand_over(xs, tensors, device)
                ctx = _context(plan.spec, job, state.on(device), stats, device=device)  # no notes: said once
                return method.reduction.map(index, state.on(device), xs, b, ctx, job.params)

            return self._run_on(job, self.devices[d], compute)

    def merge(self, state: _PerDevice, item: tuple[TensorJob, int]) -> JobOutcome:
        job, d = item
        plan, method = self.plan, self.plan.spec.method
        start = None if job.length is None else job.start
        out = JobOutcome(job.name, start)
        digests = _DigestList() if self.digest else None
        with self._threads():
            if not job.merge:
                result = _copy(plan, job, digests, out.notes).to(job.out.dtype)
            else:
                tensors, base = _inputs(plan, job, check=plan.reduction_passes == 0, digests=digests)
                stats = _statistics(plan, job, tensors)

                def compute(device: torch.device) -> tuple[tuple, list[tuple]]:
                    xs, b0 = to_device((tensors, base), device)
                    # The report's ‖θ_t − θ_0‖², taken before the method may let go of the inputs;
                    # on the first slice of every tensor only: enough to tell a fine-tune from an
                    # unrelated model, at a fraction of the cost.
                    norms = _squared_norms(xs, b0) if b0 is not None and job.start == 0 else ([], 0.0)
                    xs = _hand_over(xs, tensors, device)
                    deferred: list | None = [] if self.fused is not None else None
                    ctx = _context(
                        plan.spec, job, state.on(device), stats, out.notes, device=device, deferred=deferred
                    )
                    merged = method.fn(xs, b0, ctx, **job.params)
                    del xs
                    waiting = [
                        (d.partial, d.index, {k: v.to(job.out.dtype) for k, v in d.alternatives.items()})
                        for d in deferred or []
                    ]
                    return _summary(merged, norms, b0, device), waiting

                def _summary(
                    merged: torch.Tensor,
                    norms: tuple[list[float], float],
                    b0: torch.Tensor | None,
                    device: torch.device,
                ) -> tuple[torch.Tensor, list[float], float, bool]:
                    expected = job.out.shape if job.length is None else (job.view or (job.length,))
                    if tuple(merged.shape) != expected:
                        raise RuntimeError(
                            f"{method.name} returned shape {list(merged.shape)} for "
                            f"{job.name!r}, expected {list(expected)}"
                        )
                    if merged.device != device:
                        raise RuntimeError(
                            f"{method.name} returned {job.name!r} on {merged.device}, not {device}"
                        )
                    if job.view is not None:
                        merged = merged.reshape(-1)  # slices are written flat
                    same = b0 is not None and torch.equal(merged, b0.reshape(merged.shape))
                    return merged.to(job.out.dtype), *norms, same

                ((result, out.deltas, out.base_sq, out.same), out.deferred), out.on_host = self._run_on(
                    job, self.devices[d], compute
                )
                if self.fused is not None and len(out.deferred) != 1:
                    raise RuntimeError(
                        f"{method.name} reported {len(out.deferred)} shares of its fused pass for "
                        f"{job.name!r}, expected 1"
                    )
            if self.remote and self.sink is None:
                out.tensor = result
            else:
                self.sink.write(job.name, result, start)
                out.written = result.numel() if self.remote else None
        out.digests = list(digests or [])
        return out


def run_plan(
    plan: MergePlan,
    sink: Sink,
    *,
    workers: int | None = None,
    max_bytes: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    digest: bool = True,
    threads: int = DEFAULT_THREADS,
    devices: Sequence[torch.device] = (CPU,),
    device_fallback: bool = False,
    executor: str = "thread",
    ray_address: str | None = None,
) -> MergeReport:
    """Execute ``plan`` into ``sink``; returns timings, bytes, the measured peak RSS and (with
    ``digest``) a content digest of every input (:class:`InputDigests`).

    The bytes written depend on the plan, ``threads`` (intra-op threads per job) and ``devices``
    only: not on ``workers``, on the order jobs finish in, or on the executor (partial results are
    folded in plan order). ``devices``: where merged jobs compute, round-robin in plan order
    (:mod:`alloykit.engine.devices`); a job that runs out of device memory is an error naming it,
    or with ``device_fallback`` runs again on the host."""
    spec = plan.spec
    method = spec.method
    tune_allocator()
    kind = executor
    executor = make_executor(workers, max_bytes, kind, ray_address)
    if max_bytes is None and hasattr(executor, "max_bytes"):
        executor.max_bytes = plan.default_budget(executor.workers)
    report = MergeReport(
        tensors=len(plan.outputs),
        merged=len(plan.merged_names),
        reduction_passes=plan.reduction_passes,
        workers=getattr(executor, "workers", 1),
        threads=threads,
    )
    merged_jobs = [j for j in plan.jobs if j.merge]
    n_models = len(spec.models)
    digests = InputDigests(n_models + 1) if digest else None
    report.copied = report.tensors - report.merged
    sq_delta = [0.0] * n_models
    sq_base = [0.0]
    t0 = time.perf_counter()
    unchanged = [0]
    notes: list[str] = []
    devices = list(devices) or [CPU]
    on_host = [0]  # jobs moved back to the host after running out of device memory
    remote = bool(getattr(executor, "remote", False))
    fused_pass = getattr(method.reduction, "fused", None)
    fused = fused_pass(plan.global_params) if fused_pass is not None else None
    runner = JobRunner(plan, sink, devices, device_fallback, digest, threads, remote, fused)
    fused_acc: Any = None
    waiting = _Waiting(getattr(sink, "tmp_dir", None))
    # merged jobs go to devices round-robin in plan order
    placed = [(j, i % len(devices) if j.merge else 0) for i, j in enumerate(merged_jobs)]
    merge_items = []
    k = 0
    for j in plan.jobs:
        merge_items.append((j, k % len(devices) if j.merge else 0))
        k += j.merge

    with PeakRSS() as rss, intra_op_threads(threads):
        state: Any = None
        for p in range(plan.reduction_passes):
            fn = functools.partial(runner.reduce, p, _PerDevice(state))
            acc = None
            results = executor.run(fn, ((item, item[0].cost) for item in placed))
            for i, (partial, moved) in enumerate(in_plan_order(results)):
                on_host[0] += moved
                acc = method.reduction.fold(p, acc, partial)
                if progress:
                    progress(f"pass {p + 1}/{plan.reduction_passes}", i + 1, len(merged_jobs))
            state = method.reduction.finish(p, state, acc, plan.global_params)
            report.bytes_read += sum(j.read_bytes for j in merged_jobs)

        fn = functools.partial(runner.merge, _PerDevice(state))
        results = executor.run(fn, ((item, item[0].cost) for item in merge_items))
        for i, out in enumerate(in_plan_order(results)):
            if out.tensor is not None:
                sink.write(out.name, out.tensor, out.start)
            elif out.written is not None:
                sink.record(out.name, out.written)
            if digests is not None:
                for entry in out.digests:
                    digests.put(*entry)
            for partial, index, alternatives in out.deferred:
                fused_acc = method.reduction.fold(fused, fused_acc, partial)
                if alternatives:
                    waiting.add(out.name, out.start, index, alternatives)
            notes.extend(out.notes)
            on_host[0] += out.on_host
            if progress:
                progress("merge", i + 1, len(plan.jobs))
            unchanged[0] += out.same
            sq_base[0] += out.base_sq
            # A job's sources are the models that hold the tensor; with strict keys, all of them.
            if out.deltas and len(out.deltas) == n_models:
                for m, v in enumerate(out.deltas):
                    sq_delta[m] += v
        if fused is not None:
            # The fused pass's quantity is known now: rewrite the entries that waited for it.
            state = method.reduction.finish(fused, state, fused_acc, plan.global_params)
            outcome = method.reduction.resolve(state)
            for name, start, index, alternatives in waiting.replay():
                if outcome in alternatives:
                    sink.patch(name, start, index, alternatives[outcome])
        report.bytes_read += sum(j.read_bytes for j in plan.jobs)
        report.bytes_written = plan.write_bytes
        if digests is not None:
            report.digests = digests.combined()
    report.warnings += sorted(set(notes))
    if on_host[0]:
        report.warnings.append(
            f"{on_host[0]} job(s) ran out of device memory and were merged on the host (--device-fallback)"
        )
    report.devices = [str(d) for d in devices]
    report.executor = kind
    if getattr(executor, "nodes", None):
        report.nodes = {node[:12]: jobs for node, jobs in executor.nodes.items()}
        report.worker_peak_rss = {node[:12]: rss for node, rss in executor.peak_rss.items()}
    n_merged_jobs = len(merged_jobs)
    if n_merged_jobs and unchanged[0] == n_merged_jobs:
        report.warnings.append(
            f"the merge changed nothing: all {report.merged} merged tensors equal the base "
            "(a density, weight or scale of 0?)"
        )
    report.seconds = time.perf_counter() - t0
    report.peak_rss = rss.peak
    report.baseline_rss = rss.baseline
    if spec.base is not None and sq_base[0] > 0:
        for k, m in enumerate(spec.models):
            rel = math.sqrt(sq_delta[k] / sq_base[0])
            report.relative_delta_norm[m.label] = rel
            if spec.base_check is not None and rel > spec.base_check:
                raise MismatchError(
                    f"{m.label} differs from the base {spec.base.label} by {rel:.0%} of the "
                    f"base's norm (‖θ − θ₀‖/‖θ₀‖; allowed {spec.base_check:.0%}). Is the base the "
                    "model these were fine-tuned from? Pass base_check=None (--no-base-check) "
                    "to merge anyway."
                )
    return report

"""Where merge jobs compute: the host, one accelerator or several.

Reading and writing stay on the host; a job's inputs (tensors, base, statistics, transforms,
whole-model state) are moved to its device, the method runs there unchanged (methods are pure
tensor functions and name no device: what they create follows their inputs), and the result comes
back for writing. With several devices, jobs go round-robin in plan order, so a job's device,
and therefore the output's bytes, does not depend on timing. Each worker thread issues its
copies and kernels on its own CUDA stream, so one job's transfers overlap another's compute.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from alloykit.errors import ParameterError

CPU = torch.device("cpu")


def _available(kind: str) -> tuple[bool, int]:
    if kind == "cuda":
        ok = torch.cuda.is_available()
        return ok, torch.cuda.device_count() if ok else 0
    if kind == "mps":
        ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return ok, 1 if ok else 0
    if kind == "xpu":
        ok = bool(getattr(torch, "xpu", None) and torch.xpu.is_available())
        return ok, torch.xpu.device_count() if ok else 0
    return False, 0


def resolve_devices(device: str | torch.device | Sequence[str | torch.device] | None) -> list[torch.device]:
    """``cpu`` (default), ``cuda`` (the current GPU), ``cuda:N``, a comma-separated list or a
    sequence of those (jobs spread over them), or ``auto`` (every visible GPU, else the CPU).
    A device this machine lacks is an error saying what is there."""
    if device is None:
        return [CPU]
    if isinstance(device, str) and "," in device:
        device = [d.strip() for d in device.split(",") if d.strip()]
    if isinstance(device, Sequence) and not isinstance(device, str):
        out = [d for item in device for d in resolve_devices(item)]
        if not out:
            raise ParameterError("device: an empty list; give cpu, cuda, cuda:N or auto")
        if len(set(out)) != len(out):
            raise ParameterError(f"device: {', '.join(map(str, out))} names a device twice")
        return out
    if isinstance(device, str) and device.strip().lower() == "auto":
        ok, count = _available("cuda")
        return [torch.device("cuda", i) for i in range(count)] if ok and count else [CPU]
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ParameterError(
            f"device {device!r} is not a device ({e}); give cpu, cuda, cuda:N or auto"
        ) from None
    if d.type == "cpu":
        return [CPU]
    if d.type == "meta":
        raise ParameterError("device 'meta' holds no data; give cpu, cuda, cuda:N or auto")
    ok, count = _available(d.type)
    if not ok:
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
        raise ParameterError(f"device {d} is not available on this machine ({build}); use --device cpu")
    index = d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)
    if index >= count:
        raise ParameterError(
            f"device {d} does not exist: this machine has {count} {d.type} device(s) "
            f"({d.type}:0{f'..{d.type}:{count - 1}' if count > 1 else ''})"
        )
    return [torch.device(d.type, index)]


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts, nested) on ``device``; anything else
    as it is. A tensor already there is not copied."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device, non_blocking) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_device(v, device, non_blocking) for v in obj)
    return obj


_streams = threading.local()


class on_device:
    """Context for one job: on a CUDA device, the calling thread's own stream (made once per
    thread and device); elsewhere nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self._ctx: Any = None

    def __enter__(self) -> torch.device:
        if self.device.type == "cuda":
            cache = getattr(_streams, "by_device", None)
            if cache is None:
                cache = _streams.by_device = {}
            stream = cache.get(self.device)
            if stream is None:
                stream = cache[self.device] = torch.cuda.Stream(device=self.device)
            self._ctx = torch.cuda.stream(stream)
            self._ctx.__enter__()
        return self.device

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def is_out_of_memory(e: BaseException) -> bool:
    """A device allocation failure (CUDA, MPS or XPU), not a host one."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e) and "CPU" not in str(e)

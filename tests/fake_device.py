"""A pretend accelerator for CPU-only tests of device handling.

Inside :class:`FakeDeviceMode`, a tensor moved with ``.to(FAKE)`` (or made by a factory with
``device=FAKE``) is an :class:`OnFake`: a CPU tensor whose ``.device`` says ``meta`` and whose
results stay ``OnFake``. An op that mixes an ``OnFake`` with a host tensor of one element or
more raises :class:`DeviceMixError`, as CUDA does (0-d host tensors are allowed, as CUDA treats
them as scalars; index tensors may live on the host, as CUDA indexing allows); ``.numpy()`` of an
``OnFake`` raises too. The values are computed by the same CPU kernels, so a merge on the fake
device must give the very bytes of a merge on the host: that proves every input was moved, every
result came back, and no method created a tensor on the host and mixed it with its inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")


class DeviceMixError(RuntimeError):
    pass


class OnFake(torch.Tensor):
    pass


def _wrap(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and not isinstance(x, OnFake):
        return torch.Tensor._make_subclass(OnFake, x, x.requires_grad)
    return x


def _plain(x: Any) -> Any:
    if isinstance(x, OnFake):
        with torch._C.DisableTorchFunctionSubclass():
            return x.view_as(x).as_subclass(torch.Tensor)
    return x


def _is_fake_device(d: Any) -> bool:
    if isinstance(d, str):
        return d.startswith("meta")
    return isinstance(d, torch.device) and d.type == "meta"


def _is_host(d: Any) -> bool:
    if isinstance(d, str):
        return d.startswith("cpu")
    return isinstance(d, torch.device) and d.type == "cpu"


_INDEXING = {"__getitem__", "__setitem__", "index_select", "gather", "scatter", "scatter_", "take"}


class FakeDeviceMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901 - one dispatcher
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if func == torch.Tensor.device.__get__:
            return FAKE if isinstance(args[0], OnFake) else func(*args)
        if func == torch.Tensor.is_cuda.__get__:
            return False
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        fake = any(isinstance(t, OnFake) for t in tensors)
        if name in ("to", "cuda", "cpu", "type_as"):
            return self._transfer(func, name, args, kwargs, fake)
        if name == "numpy" and fake:
            raise DeviceMixError("numpy() of a tensor on the device")
        if "device" in kwargs and kwargs["device"] is not None:
            if _is_fake_device(kwargs["device"]):
                kwargs["device"] = "cpu"
                with torch._C.DisableTorchFunctionSubclass():
                    return tree_map(_wrap, func(*args, **kwargs))
            if _is_host(kwargs["device"]):
                fake = False  # made on the host on purpose
        if fake:
            if name in _INDEXING:
                values = [args[0]] + ([args[2]] if name == "__setitem__" and len(args) > 2 else [])
                check = [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]
            else:
                check = tensors
            host = [t for t in check if not isinstance(t, OnFake) and t.dim() > 0]
            if host:
                shapes = [tuple(t.shape) for t in host]
                raise DeviceMixError(
                    f"{name}: tensors on the device mixed with host tensors of shapes {shapes}"
                )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return tree_map(_wrap, out) if fake else out

    @staticmethod
    def _transfer(func, name, args, kwargs, fake):
        src = args[0]
        if name == "cpu":
            with torch._C.DisableTorchFunctionSubclass():
                return _plain(func(*args, **kwargs))
        if name == "cuda":
            raise DeviceMixError(".cuda() names a device")
        target = kwargs.get("device")
        rest = list(args[1:])
        for i, a in enumerate(rest):
            if isinstance(a, torch.device | str):
                target = a
                rest[i] = "cpu" if _is_fake_device(a) else a
            elif isinstance(a, torch.Tensor) and name in ("to", "type_as"):
                target = FAKE if isinstance(a, OnFake) else torch.device("cpu")
                rest[i] = _plain(a)
        if kwargs.get("device") is not None and _is_fake_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        with torch._C.DisableTorchFunctionSubclass():
            out = func(src, *rest, **kwargs)
        if target is None:
            return _wrap(out) if isinstance(src, OnFake) else out
        if _is_fake_device(target):
            return _wrap(out)
        return _plain(out)

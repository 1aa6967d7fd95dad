"""Exact order statistics of a vector that is only ever seen in pieces.

``sorted(v)[i]`` of a whole model's flattened vector, without holding the model: radix selection
on the 32-bit float patterns in two streaming passes. Pass 1 histograms the high 16 bits of an
order-preserving key and finds the bucket that holds rank ``i``; pass 2 histograms the low 16
bits of the entries inside that bucket. The value found is bit-identical to indexing the sorted
concatenation (``torch.sort`` / ``kthvalue``), ties and signs included.

(:class:`~alloykit.methods.primitives.ModelTopK` does the same for non-negative magnitudes;
this module handles any sign, so it also serves scores that can be negative.)
"""

from __future__ import annotations

import torch

BINS = 1 << 16


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values: for negative floats the 31 magnitude bits
    are flipped, so signed-integer order equals float order (−0.0 sorts just below +0.0)."""
    bits = x.float().contiguous().reshape(-1).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def high_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of the keys, shifted to [0, 2**16) in value order."""
    return torch.bincount((sort_keys(x) >> 16) + (BINS // 2), minlength=BINS)


def low_histogram(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """Counts of the low 16 bits of the keys of the entries whose high bits are ``bucket``."""
    return low_histograms(x, [bucket])[0]


def low_histograms(x: torch.Tensor, buckets: list[int | None]) -> torch.Tensor:
    """``low_histogram`` for several buckets at once (the keys are computed once); a ``None``
    bucket gives a row of zeros."""
    keys = sort_keys(x)
    high = keys >> 16
    out = torch.zeros((len(buckets), BINS), dtype=torch.int64, device=x.device)
    for j, bucket in enumerate(buckets):
        if bucket is not None:
            out[j] = torch.bincount(keys[high == bucket - BINS // 2] & 0xFFFF, minlength=BINS)
    return out


def locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bucket, rank inside the bucket) of the ``rank``-th smallest entry (1-based)."""
    cum = torch.cumsum(hist, 0)
    bucket = int(torch.searchsorted(cum, torch.tensor(rank)))
    before = int(cum[bucket - 1]) if bucket > 0 else 0
    return bucket, rank - before


def value_of(bucket: int, low_hist: torch.Tensor, rank_in_bucket: int) -> float:
    """The float whose key has high bits ``bucket`` and the low bits holding the rank."""
    cum = torch.cumsum(low_hist, 0)
    low = int(torch.searchsorted(cum, torch.tensor(rank_in_bucket)))
    key = ((bucket - BINS // 2) << 16) | low  # a Python int in the int32 range
    k = torch.tensor([key], dtype=torch.int32)
    bits = k ^ ((k >> 31) & 0x7FFFFFFF)
    return float(bits.view(torch.float32))

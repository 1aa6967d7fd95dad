"""Measuring resident memory while a merge runs, and a byte budget for jobs in flight."""

from __future__ import annotations

import resource
import threading

import psutil


class PeakRSS:
    """Samples this process's resident set size in a background thread (every ``interval`` s).

    ``peak`` is the largest sample; ``baseline`` the RSS when sampling started (interpreter,
    torch, and anything loaded before the merge)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._proc = psutil.Process()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @staticmethod
    def lifetime_peak() -> int:
        """The kernel's high-water mark for the whole process (ru_maxrss, in bytes on Linux)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ByteBudget:
    """Admits work while the bytes in flight stay under ``capacity``; a single item larger than
    the capacity is admitted alone (the bound cannot be met, but the merge still finishes)."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.in_flight = 0
        self.count = 0
        self._cond = threading.Condition()

    def acquire(self, cost: int) -> None:
        with self._cond:
            while self.capacity is not None and self.count > 0 and self.in_flight + cost > self.capacity:
                self._cond.wait()
            self.in_flight += cost
            self.count += 1

    def release(self, cost: int) -> None:
        with self._cond:
            self.in_flight -= cost
            self.count -= 1
            self._cond.notify_all()


_ALLOCATOR_TUNED = False


def tune_allocator(max_reused_bytes: int = 256 << 20) -> bool:
    """Let glibc reuse freed blocks below ``max_reused_bytes`` instead of returning them to the
    kernel: a merge allocates and frees the same few slice-sized buffers millions of times,
    and with glibc's defaults each one is a fresh ``mmap`` whose pages fault in one by one —
    measured at 3× the arithmetic itself. Larger blocks are still mapped and unmapped, so the
    resident set stays bounded by the largest working set below the threshold. Process-wide;
    a no-op off glibc. Returns whether it took effect."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, max_reused_bytes) == 1
        ok = ok and libc.mallopt(m_trim_threshold, 2 * max_reused_bytes) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok

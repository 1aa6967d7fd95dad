"""Measurement helpers shared by the benchmark drivers: page-cache residency (``mincore``), evicting
and warming inputs, the in-child measurement wrapper (wall time, CPU time, ``ru_maxrss``, VmHWM,
torch threads, optional cProfile), running a child and reading its result line, a whole-process
measurement of any command (wall time from spawn to exit, peak RSS of its process tree, the
kernel's ``ru_maxrss``), the work-folder lock and which alloykit was measured.

Nothing heavy is imported at module level (the drivers stay small; torch is imported in children).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GiB = 2**30
RESULT_PREFIX = "BENCH-RESULT "


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- page cache


def shard_files(folders: list[Path]) -> list[Path]:
    return [p for f in folders for p in sorted(f.glob("*.safetensors"))]


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages resident in the page cache (``mincore``); None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        resident = total = 0
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr is None or addr == ctypes.c_void_p(-1).value:
                    return None
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                rc = libc.mincore(addr, size, vec)
                libc.munmap(addr, size)
                if rc != 0:
                    return None
                raw = bytes(vec)
                resident += pages - raw.count(0)  # low bit set = resident; other bits reserved
                total += pages
            finally:
                os.close(fd)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def evict(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --------------------------------------------------------------------------- inside a child


def vm_hwm() -> int | None:
    """This process's own RSS high-water mark (VmHWM, per address space: unlike ru_maxrss it
    does not start at the parent's RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_here(fn: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> None:
    """Run ``fn(job)`` in this (child) process and print its result, with the time around it,
    CPU time, ``ru_maxrss``, VmHWM and the torch intra-op threads in effect, as one
    ``BENCH-RESULT {json}`` line. With ``job["profile"]`` (a path) the call runs under cProfile;
    the stats are dumped there and their text returned as ``profile_text``."""
    import cProfile
    import io
    import pstats

    import torch  # imported before timing: not part of the measurement

    import alloykit  # noqa: F401

    # The engine may set its own intra-op thread count for the run (cores // workers); record the
    # count in effect during the run, not only the one the process started with.
    job["torch_threads"] = torch.get_num_threads()
    set_threads = torch.set_num_threads

    def spy(n: int) -> None:
        if "threads_set" not in job:
            job["threads_set"] = n
        set_threads(n)

    torch.set_num_threads = spy

    prof = cProfile.Profile() if job.get("profile") else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    out = fn(job)
    if prof:
        prof.disable()
    out["seconds"] = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["user_seconds"] = ru1.ru_utime - ru0.ru_utime
    out["sys_seconds"] = ru1.ru_stime - ru0.ru_stime
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["vm_hwm"] = vm_hwm()
    out["torch_threads"] = job.get("threads_set", job["torch_threads"])
    if prof:
        prof.dump_stats(job["profile"])
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
        out["profile_text"] = text.getvalue()
    print_result(out)


def print_result(out: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def read_result(stdout: str) -> dict[str, Any]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX))
    return json.loads(line.removeprefix(RESULT_PREFIX))


# --------------------------------------------------------------------------- from the driver


def run_child(
    script: str | Path,
    job: dict[str, Any],
    timeout: float | None,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Run ``python script --child JSON`` and return its ``BENCH-RESULT`` (plus
    ``process_seconds``, the wall time of the whole child)."""
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(job)]
    env = dict(os.environ)
    if torch_threads:
        # Every thread's OpenMP team size (worker threads do not inherit set_num_threads).
        env.update(OMP_NUM_THREADS=str(torch_threads), MKL_NUM_THREADS=str(torch_threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{job['variant']} failed (exit {proc.returncode}):\n{proc.stderr}")
    out = read_result(proc.stdout)
    out["process_seconds"] = wall
    return out


def _rss(members: list[Any]) -> int:
    """Sum of the RSS of psutil.Process objects (0 for those gone meanwhile)."""
    import psutil

    total = 0
    for p in members:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _tree(proc: Any) -> list[Any]:
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def measure_process(
    cmd: list[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    poll: float = 0.02,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` to completion and measure it as a whole (interpreter start-up included).

    Returns ``returncode``; ``seconds``: spawn → exit, as seen by this process; ``peak_rss``: the
    largest sum of RSS over the process and its descendants, sampled every ``poll`` seconds by
    psutil (the list of descendants is refreshed every 10th sample); ``ru_maxrss``: the kernel's
    high-water mark of the largest process in the tree, from ``wait4`` (the per-child reading of
    ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is a running maximum over every child this
    process has waited for); ``user_seconds`` and ``sys_seconds``: the tree's CPU time;
    ``samples`` and ``timed_out``. stdout and stderr go to ``log_path`` (or are discarded)."""
    import psutil

    out_f = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        popen = subprocess.Popen(cmd, stdout=out_f, stderr=subprocess.STDOUT, env=env)
        proc = psutil.Process(popen.pid)
        peak = 0
        samples = 0
        done = threading.Event()
        status: dict[str, Any] = {}

        def reap() -> None:  # wait4 in a thread, so that the sampling loop never blocks on it
            _, st, ru = os.wait4(popen.pid, 0)
            status.update(t=time.perf_counter(), status=st, rusage=ru)
            done.set()

        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        timed_out = False
        members = [proc]
        while not done.is_set():
            if samples % 10 == 0:  # the tree is listed every 10th sample (a scan of /proc)
                members = _tree(proc)
            peak = max(peak, _rss(members))
            samples += 1
            if timeout is not None and time.perf_counter() - t0 > timeout:
                timed_out = True
                for p in reversed(_tree(proc)):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                done.wait()
                break
            done.wait(poll)
        reaper.join()
        popen.returncode = os.waitstatus_to_exitcode(status["status"])  # already reaped by wait4
    finally:
        if log_path:
            out_f.close()  # type: ignore[union-attr]
    ru = status["rusage"]
    return {
        "returncode": popen.returncode,
        "seconds": status["t"] - t0,
        "peak_rss": peak,
        "ru_maxrss": ru.ru_maxrss * 1024,
        "user_seconds": ru.ru_utime,
        "sys_seconds": ru.ru_stime,
        "samples": samples,
        "timed_out": timed_out,
    }


def exclusive(workdir: Path, log: Callable[[str], None] = log):
    """Hold a lock on the work folder: two benchmark runs at once share 2 cores and make each
    other's timings meaningless, so a second run waits for the first."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / ".bench.lock", "w")  # held for the process lifetime  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another benchmark holds {workdir}/.bench.lock; waiting for it to finish")
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


# --------------------------------------------------------------------------- versions and machine


def alloykit_version() -> dict[str, Any]:
    """Which alloykit was measured: git HEAD, whether alloykit/ has uncommitted changes, and a
    digest of its sources (the working tree is what runs, committed or not)."""
    import importlib.util

    spec = importlib.util.find_spec("alloykit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    pkg = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    out: dict[str, Any] = {"path": str(pkg), "sources_sha256": h.hexdigest()[:12]}

    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(pkg.parent), *a], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode == 0:
        out["git_head"] = head.stdout.strip()
        out["dirty"] = git("diff", "--quiet", "HEAD", "--", str(pkg)).returncode != 0
    return out


def describe_version(version: dict[str, Any]) -> str:
    return (
        f"alloykit {version.get('git_head', '?')}"
        + (" + uncommitted changes" if version.get("dirty") else "")
        + f", sources sha256 {version.get('sources_sha256', '?')}"
    )


def machine() -> dict[str, Any]:
    """CPU count, model name, memory and the load averages now."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "load": list(os.getloadavg())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info

"""Ray executor benchmarks.

1. ``--simulate``: how a merge plan's jobs spread over 1-64 workers. The plan of a 70 B-shaped
   Llama (80 layers × 8192, FFN 28672, vocab 128256, bf16; base + 2 fine-tunes) is built from
   shapes alone (no data), and its jobs are list-scheduled in plan order onto W workers with
   each job's time proportional to its planned bytes (the engine's elementwise jobs are memory
   bound). Printed: makespan relative to 1 worker (speed-up), efficiency, and the peak planned
   memory per worker.
2. ``--cluster``: a local two-node Ray cluster (a head and a worker started as separate
   processes on loopback, one CPU each) merging the benchmark's generated checkpoints
   (``bench_merge.py --size``) with ``executor="ray"`` against the thread executor in the same
   run: wall time and peak memory as ratios.
"""

from __future__ import annotations

import argparse
import heapq
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

LLAMA_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def _meta_model(cfg: dict) -> dict[str, torch.Tensor]:
    from bench_merge import llama_tensors

    return {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in llama_tensors(cfg)}


def simulate(method: str, workers: list[int]) -> None:
    from alloykit.api import build_spec
    from alloykit.engine.plan import plan_merge

    models = [_meta_model(LLAMA_70B) for _ in range(3)]
    spec = build_spec(models[1:], models[0], method, check_finite=False)
    plan = plan_merge(spec)
    costs = [j.cost for j in plan.jobs]
    reads = [j.read_bytes for j in plan.jobs]
    n_params = sum(t.numel() for t in models[0].values())
    print(f"{method} on a 70 B-shaped plan: {n_params / 1e9:.1f} B parameters, {len(plan.jobs)} jobs, "
          f"{plan.reduction_passes} reduction passes")  # fmt: skip
    print("| workers | speed-up | efficiency | peak planned memory per worker (GiB) |")
    print("|---:|---:|---:|---:|")
    base = sum(reads)
    for w in workers:
        finish = [(0.0, i) for i in range(w)]
        peak = [0] * w
        heapq.heapify(finish)
        for read, cost in zip(reads, costs, strict=True):
            t, i = heapq.heappop(finish)
            peak[i] = max(peak[i], cost)
            heapq.heappush(finish, (t + read, i))
        makespan = max(t for t, _ in finish)
        print(f"| {w} | {base / makespan:.2f} | {base / makespan / w:.0%} | {max(peak) / 2**30:.2f} |")


def cluster(size: str, method: str, workdir: Path) -> None:
    from bench_merge import generate

    import alloykit

    root = workdir / size
    if not (root / "ft2").exists():
        generate(root, size, "2GB", print)
    base, fts = str(root / "base"), [str(root / "ft1"), str(root / "ft2")]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    port = "6391"
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"]
    subprocess.run(head, env=env, check=True, capture_output=True)
    subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    try:
        rows = []
        for executor in ("thread", "ray"):
            out = workdir / f"out-{executor}"
            t = time.perf_counter()
            kw = {"executor": "ray", "ray_address": f"127.0.0.1:{port}"} if executor == "ray" else {}
            res = alloykit.merge(fts, base, method, out, workers=2, out_dtype="bfloat16", force=True, **kw)
            wall = time.perf_counter() - t
            rep = res.report
            rows.append((executor, wall, rep.peak_rss, rep.nodes, rep.worker_peak_rss))
        floor = rows[0][1]
        same = all(
            (workdir / "out-thread" / f.name).read_bytes() == f.read_bytes()
            for f in sorted((workdir / "out-ray").glob("*.safetensors"))
        )
        print(f"output shards byte-identical between the executors: {'yes' if same else 'NO'}")
        print("| executor | wall s | × thread | driver peak RSS GiB | jobs per node | worker peak RSS GiB |")
        print("|---|---:|---:|---:|---|---|")
        for ex, wall, rss, nodes, peaks in rows:
            jobs = ", ".join(str(v) for v in nodes.values()) or "–"
            wp = ", ".join(f"{v / 2**30:.2f}" for v in peaks.values()) or "–"
            print(f"| {ex} | {wall:.1f} | {wall / floor:.2f} | {rss / 2**30:.2f} | {jobs} | {wp} |")
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--cluster", action="store_true")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "alloykit-bench")
    args = ap.parse_args()
    if args.simulate or not args.cluster:
        simulate(args.method, [1, 2, 4, 8, 16, 32, 64])
    if args.cluster:
        cluster(args.size, args.method, args.workdir)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Start-up time of the command line, against the interpreter and ``import torch`` measured in
the same run.

Rows: ``python -c pass`` (the floor of any command), ``python -c "import torch"`` (what a merge
cannot avoid), ``alloykit --help``, ``alloykit methods``, and a small merge from a recipe (a
6-tensor model, 3 fine-tunes, task arithmetic, written to disk). Each command runs ``--repeat``
times in a fresh process; the table shows the median and the ratio to ``import torch``.

    python benchmarks/bench_startup.py --repeat 7
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _small_models(folder: Path) -> Path:
    """A base and three fine-tunes of a 6-tensor model, and a recipe merging them."""
    code = f"""
import json, torch
from pathlib import Path
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
shapes = {{"embed.weight": (12, 6), "layers.0.attn.weight": (6, 6), "layers.0.attn.bias": (6,),
          "layers.1.mlp.weight": (8, 6), "layers.1.norm.weight": (6,), "head.weight": (3, 6)}}
base = {{k: torch.randn(s, generator=g) for k, s in shapes.items()}}
for name, scale in [("base", 0.0), ("ft0", 0.05), ("ft1", 0.05), ("ft2", 0.05)]:
    d = Path({str(folder)!r}) / name
    d.mkdir(parents=True)
    save_file({{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({{"model_type": "toy"}}))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    recipe = folder / "recipe.yml"
    recipe.write_text(
        json.dumps(
            {
                "method": "task_arithmetic",
                "base_model": str(folder / "base"),
                "models": [{"model": str(folder / f"ft{i}")} for i in range(3)],
                "parameters": {"lambda": 0.5},
            }
        )
    )
    return recipe


def _time(cmd: list[str], repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    cli = [py, "-m", "alloykit.cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = _small_models(Path(tmp))
        out = Path(tmp) / "merged"

        def clear() -> None:
            shutil.rmtree(out, ignore_errors=True)

        for cmd in (cli + ["--help"], [py, "-c", "import torch"]):  # warm the bytecode caches
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [
            ("python -c pass", _time([py, "-c", "pass"], args.repeat)),
            ('python -c "import torch"', _time([py, "-c", "import torch"], args.repeat)),
            ("alloykit --help", _time(cli + ["--help"], args.repeat)),
            ("alloykit methods", _time(cli + ["methods"], args.repeat)),
            (
                "alloykit merge (small recipe)",
                _time(cli + ["merge", str(recipe), "-o", str(out), "--no-progress"], args.repeat, clear),
            ),
        ]
    torch_s = rows[1][1]
    print(f"start-up, median of {args.repeat} runs (python {sys.version.split()[0]})\n")
    print(f"| {'command':<30} | {'seconds':>7} | {'÷ import torch':>14} |")
    print(f"|{'-' * 32}|{'-' * 9}:|{'-' * 15}:|")
    for name, s in rows:
        print(f"| {name:<30} | {s:7.2f} | {s / torch_s:14.2f} |")


if __name__ == "__main__":
    main()

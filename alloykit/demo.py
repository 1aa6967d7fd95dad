"""The bundled example: a small multi-task model, three fine-tunes, every method, one table.

Everything is built here, offline, in seconds: a base MLP pre-trained on an auxiliary task,
three fine-tunes on three synthetic classification tasks (each trains the shared trunk and its
own head), written as safetensors folders; each method merges the folders through the same
engine a real checkpoint goes through, and each merged model is scored on every task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import nn

D_IN, HIDDEN, CLASSES, TASKS = 32, 64, 4, 3

# Settings shown for some methods: (label, method, preset, global parameters). λ values are the
# usual ones for a handful of tasks without tuning; the papers tune λ on validation data. Every
# registered method not listed here is run once with its defaults (see demo_merges()).
DEMO_MERGES: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("linear (model soup)", "linear", None, {}),
    ("task_arithmetic λ=0.5", "task_arithmetic", None, {"lambda": 0.5}),
    ("ties (paper) λ=1", "ties", "paper", {"density": 0.2, "lambda": 1.0}),
    ("ties (mergekit) λ=1", "ties", "mergekit", {"density": 0.2, "lambda": 1.0}),
    ("dare+TA p=0.5 λ=0.5", "dare", "paper", {"density": 0.5, "lambda": 0.5}),
    ("dare+TIES p=0.5", "dare", "paper", {"density": 0.5, "combine": "ties", "aggregate": "mean"}),
    ("magnitude_prune λ=0.5", "magnitude_prune", None, {"density": 0.2, "lambda": 0.5}),
]


def demo_merges() -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """The listed settings, plus every other registered method with its defaults."""
    from alloykit.methods import REGISTRY, get_method

    get_method("linear")  # make sure the registry is filled
    listed = {m for _, m, _, _ in DEMO_MERGES}
    # methods for models trained separately (alignment) need a model definition: see bench align
    extra = [
        (f"{name} (defaults)", name, None, {})
        for name in sorted(REGISTRY)
        if name not in listed and REGISTRY[name].alignment is None
    ]
    return DEMO_MERGES + extra


class MultiTaskMLP(nn.Module):
    def __init__(self, n_heads: int = TASKS, aux_classes: int = 8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.aux = nn.Linear(HIDDEN, aux_classes)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, CLASSES) for _ in range(n_heads))

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        h = self.trunk(x)
        return self.aux(h) if task is None else self.heads[task](h)


def _tasks(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    world = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5  # shared "features of the world"
    heads = [torch.randn(CLASSES, D_IN, generator=g) for _ in range(TASKS)]
    aux = torch.randn(8, D_IN, generator=g)
    return world, heads, aux


def _data(world: torch.Tensor, head: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return x, (torch.tanh(x @ world.T * 3) @ head.T).argmax(1)


def _train(
    model: MultiTaskMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    task: int | None,
    steps: int,
    params: list[nn.Parameter],
    seed: int,
    lr: float,
) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx], task), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model: MultiTaskMLP, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
    with torch.no_grad():
        return float((model(x, task).argmax(1) == y).float().mean())


def build_models(
    workdir: Path, seed: int = 0
) -> tuple[Path, list[Path], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Train and save the base and the fine-tunes; returns their folders and the test sets.
    Each fine-tune's folder also gets its calibration statistics (32 training inputs of its
    task through it): ``activations.safetensors`` (for ESM, RegMean) and
    ``fisher.safetensors`` (labelled, for Fisher merging)."""
    torch.manual_seed(seed)
    world, heads, aux = _tasks(seed)
    base = MultiTaskMLP()
    xa, ya = _data(world, aux, 4096, seed + 100)
    _train(base, xa, ya, None, 600, list(base.parameters()), seed, lr=3e-3)
    folders = []
    tests = []
    _save(base, workdir / "base")
    for t in range(TASKS):
        model = MultiTaskMLP()
        model.load_state_dict(base.state_dict())
        x, y = _data(world, heads[t], 4096, seed + 10 * t + 1)
        tests.append(_data(world, heads[t], 2048, seed + 10 * t + 2))
        _train(
            model,
            x,
            y,
            t,
            300,
            list(model.trunk.parameters()) + list(model.heads[t].parameters()),
            seed + t,
            lr=1e-3,
        )
        folder = _save(model, workdir / f"finetune-task{t}")
        _calibrate(model, x[:32], y[:32], t, folder)
        folders.append(folder)
    return workdir / "base", folders, tests


def _calibrate(model: MultiTaskMLP, x: torch.Tensor, y: torch.Tensor, task: int, folder: Path) -> None:
    from alloykit.calibration import calibrate

    batches = [(x[i : i + 8], task) for i in range(0, len(x), 8)]
    # the trunk is what the tasks share; the heads of other tasks never run on this task's data
    calibrate(model, batches, include=[r"^trunk\."], output=folder / "activations.safetensors")

    def log_probs(m: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        xb, yb = batch
        return torch.log_softmax(m(xb, task), dim=-1), yb

    labelled = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    calibrate(model, labelled, kind="fisher", log_probs=log_probs, include=[r"^trunk\."],
              output=folder / "fisher.safetensors")  # fmt: skip


def _save(model: nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"model_type": "alloykit-demo-mlp", "d_in": D_IN, "hidden": HIDDEN, "tasks": TASKS}) + "\n"
    )
    return folder


def _load(folder: Path) -> MultiTaskMLP:
    m = MultiTaskMLP()
    m.load_state_dict(load_file(folder / "model.safetensors"))
    return m


def run_demo(workdir: Path, console: Console | None = None) -> dict[str, list[float]]:
    """Build, merge with every method, print and return {row label: per-task accuracies}."""
    from alloykit import merge

    console = console or Console()
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    base, finetunes, tests = build_models(workdir)
    rows: dict[str, list[float]] = {}

    def score(model: MultiTaskMLP) -> list[float]:
        return [accuracy(model, x, y, t) for t, (x, y) in enumerate(tests)]

    rows["base (pre-trained)"] = score(_load(base))
    individual = [accuracy(_load(f), *tests[t], t) for t, f in enumerate(finetunes)]
    rows["fine-tuned, each on its own task"] = individual
    from alloykit.methods import get_method

    for i, (label, method, preset, params) in enumerate(demo_merges()):
        m = get_method(method)
        out = workdir / "merged" / f"{i:02d}-{method}"
        models = finetunes[: m.max_models] if m.max_models else finetunes
        stats = [str(f / f"{m.statistics}.safetensors") for f in models] if m.statistics else None
        res = merge(
            [str(f) for f in models],
            str(base) if m.needs_base else None,
            method,
            out,
            preset=preset,
            parameters=params,
            force=True,
            statistics=stats,
        )
        rows[label] = score(_load(res.output))

    table = Table(
        title="alloykit demo: accuracy of each merged model on each task "
        "(normalized = accuracy / fine-tuned accuracy)"
    )
    table.add_column("model")
    for t in range(TASKS):
        table.add_column(f"task {t}", justify="right")
    table.add_column("average", justify="right")
    table.add_column("normalized", justify="right")
    for label, accs in rows.items():
        avg = sum(accs) / len(accs)
        norm = sum(a / i for a, i in zip(accs, individual, strict=True)) / len(accs)
        table.add_row(label, *[f"{a:.1%}" for a in accs], f"{avg:.1%}", f"{norm:.1%}")
    console.print(table)
    console.print(f"models and merges are in {workdir}/")
    return rows

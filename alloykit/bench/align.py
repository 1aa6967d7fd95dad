"""``alloykit bench align``: models trained separately, merged.

Protocol (ZipIt!/MuDSC's, offline): one dataset split into disjoint label groups (tasks); one model
per task, each from its own random initialisation, trained only on its task's examples against a
frozen head shared by all models (fixed random class vectors, like the CLIP text head of those
papers, so the output space is common and the last layer needs no permutation). Each alignment
method merges the models through alloykit's engine (tracing, self-check, statistics on unlabeled
training images of all tasks, solve, merge, BatchNorm reset for networks with BatchNorm). Reported
on the test split: joint accuracy (argmax over every task's classes), per-task accuracy (argmax
within the task) and their mean; the individual models and their ensemble (each model scores its
own task's classes; the most confident wins: the upper bound). Methods that declare a search (MuDSC's
α) are tuned on a held-out part of the training data. Trained models are cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from alloykit.bench.align_data import Images, Task, digits, fashion_mnist, glyphs, subsample, task_split
from alloykit.bench.align_models import ARCHITECTURES, class_embeddings, ensemble_logits, evaluate, train
from alloykit.errors import MissingDependencyError

METHODS = ("weight_average", "weight_matching", "activation_matching", "zipit", "mudsc_align", "mudsc_zip")
DATASETS: dict[str, Callable[[], Images]] = {"fashion": fashion_mnist, "digits": digits, "glyphs": glyphs}
GROUPS = {2: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], 3: [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]}
CACHE_VERSION = 1


@dataclass(frozen=True)
class AlignSettings:
    dataset: str = "fashion"
    architectures: tuple[str, ...] = ("mlp", "resnet", "gn_cnn", "vit")
    n_models: tuple[int, ...] = (2, 3)
    train_per_class: int | None = 1500
    test_per_class: int | None = 500
    validation_per_class: int = 50  # held out of the training images, for choosing α
    epochs: int = 4
    lr: float = 2e-3
    batch_size: int = 128
    align_samples: int = 1000  # unlabeled training images (all tasks) for statistics and BN reset
    align_batch: int = 250
    seed: int = 0
    methods: tuple[str, ...] = METHODS

    def training(self) -> dict[str, Any]:
        keys = ("dataset", "train_per_class", "validation_per_class", "epochs", "lr", "batch_size", "seed")
        return {k: getattr(self, k) for k in keys}


FULL = AlignSettings()
QUICK = replace(
    FULL,
    dataset="digits",
    architectures=("mlp", "resnet", "gn_cnn", "vit"),
    n_models=(2,),
    train_per_class=None,
    test_per_class=None,
    validation_per_class=15,
    epochs=20,  # ~550 images per task: 8 epochs left the CNNs and the ViT near chance
    batch_size=64,
    align_samples=400,
    align_batch=200,
)


def cache_home() -> Path:
    return Path(os.environ.get("ALLOYKIT_CACHE", Path.home() / ".cache" / "alloykit")) / "align"


def _split_validation(task: Task, per_class: int, seed: int) -> tuple[Task, torch.Tensor, torch.Tensor]:
    """The task with ``per_class`` training images per class held out, and those images."""
    g = torch.Generator().manual_seed(seed)
    hold = []
    for c in task.classes:
        idx = torch.nonzero(task.y_train == c).flatten()
        hold.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    held = torch.cat(hold)
    keep = torch.ones(len(task.y_train), dtype=torch.bool)
    keep[held] = False
    kept = Task(task.name, task.classes, task.x_train[keep], task.y_train[keep], task.x_test, task.y_test)
    return kept, task.x_train[held], task.y_train[held]


def _model_path(cache: Path, settings: AlignSettings, arch: str, groups: list[list[int]], index: int) -> Path:
    key = {"v": CACHE_VERSION, "arch": arch, "groups": groups, "index": index, **settings.training()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"{settings.dataset}-{arch}-{len(groups)}m-{index}-{digest}.safetensors"


def trained_models(
    settings: AlignSettings,
    arch: str,
    tasks: list[Task],
    class_emb: torch.Tensor,
    cache: Path,
    log: Callable[[str], None],
) -> tuple[list[torch.nn.Module], list[dict[str, Any]]]:
    """One model per task, seed ``seed + 1000·arch index + task``, trained or loaded from the cache."""
    from safetensors.torch import load_file, save_file

    factory = ARCHITECTURES[arch]
    groups = [t.classes for t in tasks]
    models, info = [], []
    for i, task in enumerate(tasks):
        seed = settings.seed + 7919 * (list(ARCHITECTURES).index(arch) + 1) + i
        model = factory(seed=seed)
        path = _model_path(cache, settings, arch, groups, i)
        if path.exists():
            model.load_state_dict(load_file(path))
            info.append({"cached": str(path)})
        else:
            size = f"{len(task.y_train)} images × {settings.epochs} epochs"
            log(f"    training {arch} #{i} on {task.name} ({size})")
            out = train(
                model,
                task.x_train,
                task.y_train,
                class_emb,
                epochs=settings.epochs,
                lr=settings.lr,
                batch_size=settings.batch_size,
                seed=seed,
            )
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
            info.append({"seconds": round(out["seconds"], 1), "final_loss": out["epoch_loss"][-1]})
        models.append(model.eval())
    return models, info


def _has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def merge_and_score(
    method: str,
    models: list[torch.nn.Module],
    factory: Callable[[], torch.nn.Module],
    batches: list[torch.Tensor],
    class_emb: torch.Tensor,
    tasks: list[Task],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    cached: dict[str, Any],
) -> dict[str, Any]:
    """Merge with ``method`` (its declared search tuned on validation), then score on test. The
    trace, the self-check and the activation statistics are computed once per model set and
    reused by every method and every trial (``cached``)."""
    import alloykit
    from alloykit.alignment.align import Alignment
    from alloykit.alignment.check import self_check
    from alloykit.alignment.pipeline import solve_alignment
    from alloykit.alignment.statistics import collect_activation_statistics
    from alloykit.alignment.trace import trace_groups
    from alloykit.methods import get_method

    m = get_method(method)
    states = [md.state_dict() for md in models]
    n = len(models)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if "table" not in cached:
        traced = trace_groups(models[0], (batches[0],))
        cached["table"], cached["gm"] = traced.table, traced.graph_module
        cached["seconds"] = {"trace": time.perf_counter() - t0}
        t1 = time.perf_counter()
        self_check(models[0], cached["table"], (batches[0],))
        cached["seconds"]["self_check"] = time.perf_counter() - t1
    table = cached["table"]

    def stats():
        if "stats" not in cached:
            t = time.perf_counter()
            cached["stats"] = collect_activation_statistics(models[0], cached["gm"], states, table, batches)
            cached["seconds"]["statistics"] = time.perf_counter() - t
        return cached["stats"]

    def solve(params: dict[str, Any]) -> Alignment:
        t = time.perf_counter()
        history: list[dict[str, Any]] = []
        trs = solve_alignment(m.alignment, params, table, states, lambda: stats().correlation, history)
        times["solve"] = times.get("solve", 0.0) + time.perf_counter() - t
        return Alignment(table, trs, n, history)

    post = "bn_reset" if _has_bn(models[0]) else "none"

    def merged_model(params: dict[str, Any]) -> torch.nn.Module:
        al = solve(params)
        t = time.perf_counter()
        res = alloykit.merge(
            states, None, method, parameters=params, alignment=al, model=factory, data=batches, post=post
        )
        times["merge"] = times.get("merge", 0.0) + time.perf_counter() - t
        out = factory()
        out.load_state_dict(res.state_dict)
        return out.eval()

    resolved = m.resolve(n)
    resolved = {p.name: resolved[p.py_name] for p in m.params}
    trials = []
    best = dict(resolved)
    for key, space in m.search.items():
        values = list(getattr(space, "values", ())) or list(space.grid)
        scored = []
        for v in values:
            params = {**resolved, key: v}
            acc = evaluate(merged_model(params), x_val, y_val, class_emb, tasks)["per_task_mean"]
            scored.append((acc, v))
            trials.append({key: v, "validation": acc})
        best[key] = max(scored, key=lambda s: (s[0], -abs(s[1] - resolved[key])))[1]
    final = merged_model(best)
    result = evaluate(final, x_test, y_test, class_emb, tasks)
    chosen = {k: best[k] for k in m.search} if m.search else {}
    return {**result, "post": post, "chosen": chosen, "trials": trials, "seconds": times}


def run(
    settings: AlignSettings,
    out: str | os.PathLike,
    *,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
    images: Images | None = None,
) -> dict[str, Any]:
    """Train (cached), merge with every method, score; write ``results.json`` and ``report.md``."""
    from alloykit.methods import get_method

    for method in settings.methods:
        if get_method(method).alignment is None:
            raise ValueError(f"{method} is not a method for models trained separately")
    unknown = [a for a in settings.architectures if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; known: {', '.join(ARCHITECTURES)}")
    torch.set_num_threads(1)  # small models: one thread each is fastest on a shared 2-core machine
    cache = cache or cache_home()
    t_start = time.perf_counter()
    images = images or DATASETS[settings.dataset]()
    images = subsample(images, settings.train_per_class, settings.test_per_class, seed=settings.seed)
    n_classes = len(images.classes)
    class_emb = class_embeddings(n_classes, 32, seed=settings.seed)
    results: dict[str, Any] = {"settings": asdict(settings), "dataset": images.name, "runs": []}
    g = torch.Generator().manual_seed(settings.seed)
    for n_models in settings.n_models:
        groups = GROUPS[n_models] if n_classes >= 10 else _even_groups(n_classes, n_models)
        tasks_full = task_split(images, groups)
        held = [_split_validation(t, settings.validation_per_class, settings.seed) for t in tasks_full]
        tasks = [h[0] for h in held]
        x_val = torch.cat([h[1] for h in held])
        y_val = torch.cat([h[2] for h in held])
        pool = torch.cat([t.x_train for t in tasks])
        pick = torch.randperm(len(pool), generator=g)[: settings.align_samples]
        batches = list(pool[pick].split(settings.align_batch))
        for arch in settings.architectures:
            log(f"  {arch}, {n_models} models ({', '.join(t.name for t in tasks)})")
            t0 = time.perf_counter()
            models, info = trained_models(settings, arch, tasks, class_emb, cache, log)
            rows: dict[str, Any] = {}
            for i, md in enumerate(models):
                rows[f"model {chr(ord('A') + i)}"] = evaluate(
                    md, images.x_test, images.y_test, class_emb, tasks
                )
            rows["ensemble"] = evaluate(
                lambda x, ms=models, ts=tasks: ensemble_logits(ms, class_emb, ts, x),
                images.x_test,
                images.y_test,
                class_emb,
                tasks,
            )
            cached: dict[str, Any] = {}
            factory = _factory(arch, models[0])
            for method in settings.methods:
                try:
                    rows[method] = merge_and_score(
                        method,
                        models,
                        factory,
                        batches,
                        class_emb,
                        tasks,
                        x_val,
                        y_val,
                        images.x_test,
                        images.y_test,
                        cached,
                    )
                    r = rows[method]
                    chosen = f" ({r['chosen']})" if r["chosen"] else ""
                    log(f"    {method}: per-task {r['per_task_mean']:.1%}, joint {r['joint']:.1%}{chosen}")
                except Exception as e:  # one failing method must not end the run
                    rows[method] = {"error": f"{type(e).__name__}: {e}"}
                    log(f"    {method}: error: {e}")
            results["runs"].append(
                {
                    "architecture": arch,
                    "n_models": n_models,
                    "tasks": [t.name for t in tasks],
                    "training": info,
                    "rows": rows,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "shared_seconds": {k: round(v, 2) for k, v in cached.get("seconds", {}).items()},
                }
            )
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(Path(out), results, log=log)
    return results


def _even_groups(n_classes: int, n_models: int) -> list[list[int]]:
    per = n_classes // n_models
    return [list(range(i * per, (i + 1) * per if i < n_models - 1 else n_classes)) for i in range(n_models)]


def _factory(arch: str, example: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import copy

        return copy.deepcopy(example)

    return make


def write_report(
    out: Path, results: dict[str, Any], *, draw: bool = True, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """``results.json`` and ``report.md`` first, then (with ``draw``) the plot, linked from the
    report; without matplotlib the plot is skipped with a message."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [f"# bench align: {results['dataset']}", ""]
    lines.append(
        "Test accuracy (%). per-task: argmax within the task's classes, mean over tasks; joint: argmax "
        "over every task's classes. Ensemble: each model scores its own task (upper bound). "
        f"Wall time {results['wall_seconds'] / 60:.1f} min."
    )
    for run in results["runs"]:
        tasks = run["tasks"]
        lines += ["", f"## {run['architecture']}, {run['n_models']} models", ""]
        lines.append("| method | per-task mean | joint | " + " | ".join(tasks) + " | chosen | solve s |")
        lines.append("|---|---:|---:|" + "---:|" * len(tasks) + "---|---:|")
        for name, r in run["rows"].items():
            if "error" in r:
                lines.append(
                    f"| {name} | – | – | " + " | ".join("–" for _ in tasks) + f" | {r['error'][:80]} | |"
                )
                continue
            per = " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks)
            chosen = ", ".join(f"{k}={v}" for k, v in r.get("chosen", {}).items())
            solve = r.get("seconds", {}).get("solve")
            lines.append(
                f"| {name} | {100 * r['per_task_mean']:.1f} | {100 * r['joint']:.1f} | {per} | {chosen} | "
                + (f"{solve:.1f}" if solve is not None else "")
                + " |"
            )
        shared = run.get("shared_seconds", {})
        if shared:
            lines.append("")
            lines.append("Shared steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in shared.items()))
    claims = claim_checks(results)
    if claims:
        lines += ["", "## The MuDSC paper's claims on this run", ""]
        head = "MuDSC-zip ≥ ZipIt | MuDSC-align ≥ max(weight, activation matching)"
        lines.append(f"| run | {head} |")
        lines.append("| | per-task / joint (points) | per-task / joint (points) |")
        lines.append("|---|---|---|")
        for c in claims:
            lines.append(f"| {c['run']} | {c['zip']} | {c['align']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    files = {"results": out / "results.json", "report": out / "report.md"}
    if draw:
        try:
            files["plot"] = plot(out, results)
        except MissingDependencyError as e:  # the tables are written: nothing is lost
            log(f"  {e}; the results are in {out / 'results.json'} and {out / 'report.md'}")
        else:
            with (out / "report.md").open("a") as f:
                f.write(f"\n![accuracy]({files['plot'].name})\n")
    return files


def plot(out: Path, results: dict[str, Any]) -> Path:
    """``accuracy.png``: per run (architecture × model count), per-task mean and joint accuracy of
    every row as paired bars; the ensemble's per-task accuracy as a dashed line."""
    from alloykit.evaluation.report import PLOTS_NEED

    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(PLOTS_NEED) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    cols = min(4, len(runs)) or 1
    nrows = (len(runs) + cols - 1) // cols or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, run in zip(axes.flat, runs, strict=False):
        names = [k for k, v in run["rows"].items() if "error" not in v]
        x = list(range(len(names)))
        per = [100 * run["rows"][k]["per_task_mean"] for k in names]
        joint = [100 * run["rows"][k]["joint"] for k in names]
        ax.bar([i - 0.2 for i in x], per, width=0.4, label="per-task", color="#3b75af")
        ax.bar([i + 0.2 for i in x], joint, width=0.4, label="joint", color="#e1812c")
        if "ensemble" in run["rows"]:
            ax.axhline(100 * run["rows"]["ensemble"]["per_task_mean"], color="#555", ls="--", lw=1)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_title(f"{run['architecture']}, {run['n_models']} models", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"bench align: {results['dataset']} (test accuracy %, dashed: ensemble)")
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def claim_checks(results: dict[str, Any]) -> list[dict[str, str]]:
    """Per run, whether MuDSC-zip ≥ ZipIt and MuDSC-align ≥ max(weight matching, activation
    matching), per-task and joint, with the differences in points."""

    def verdict(rows: dict[str, Any], ours: str, others: Sequence[str]) -> str:
        if any(k not in rows or "error" in rows[k] for k in (ours, *others)):
            return "–"
        cells = []
        for metric in ("per_task_mean", "joint"):
            best = max(rows[k][metric] for k in others)
            diff = 100 * (rows[ours][metric] - best)
            cells.append(f"{'yes' if diff >= 0 else 'no'} ({diff:+.1f})")
        return " / ".join(cells)

    out = []
    for run in results["runs"]:
        rows = run["rows"]
        out.append(
            {
                "run": f"{run['architecture']} ×{run['n_models']}",
                "zip": verdict(rows, "mudsc_zip", ["zipit"]),
                "align": verdict(rows, "mudsc_align", ["weight_matching", "activation_matching"]),
            }
        )
    return [c for c in out if c["zip"] != "–" or c["align"] != "–"]


def summary(results: dict[str, Any], methods: Sequence[str] = METHODS) -> list[str]:
    """One line per run: per-task mean of each row."""
    out = []
    for run in results["runs"]:
        cells = [f"{k} {100 * v['per_task_mean']:.1f}" for k, v in run["rows"].items() if "error" not in v]
        out.append(f"{run['architecture']} ×{run['n_models']}: " + ", ".join(cells))
    return out

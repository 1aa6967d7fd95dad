"""Benchmark reports: results JSON, a Markdown table, and PNG plots.

Plots: per-task test accuracy by method (heatmap), normalized-accuracy ranking, task-vector
cosine similarity, and the validation sweeps the hyperparameter search made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import MissingDependencyError
from alloykit.evaluation.harness import Row


def task_vector_cosines(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]]
):
    """Cosine similarity between the flattened task vectors τ_t = θ_t − θ_0 (float tensors only)."""
    names = list(finetuned)
    n = len(names)
    dots = torch.zeros(n, n, dtype=torch.float64)
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        taus = torch.stack([finetuned[t][k].double().flatten() - b.double().flatten() for t in names])
        dots += taus @ taus.T
    norms = dots.diagonal().sqrt().clamp(min=1e-300)
    return names, (dots / norms[:, None] / norms[None, :]).tolist()


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _params(row: Row) -> str:
    if not row.params:
        return "defaults"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items())


def markdown(rows: Sequence[Row], tasks: Sequence[str], title: str, notes: Sequence[str] = ()) -> str:
    ok = [r for r in rows if r.status == "ok"]
    ranked = [r for r in ok if r.kind == "reference"] + sorted(
        (r for r in ok if r.kind == "method"), key=lambda r: -(r.mean_normalized or 0)
    )
    lines = [f"# {title}", ""]
    lines += list(notes) + [""] if notes else []
    lines += [
        "Test accuracy (%), mean over tasks; normalized = merged ÷ the task's fine-tuned accuracy. "
        "Hyperparameters chosen on validation only.",
        "",
        "| method | abs. acc | norm. acc | chosen parameters | search | merge s |",
        "|---|---:|---:|---|---|---:|",
    ]
    for r in ranked:
        merge_s = f"{r.merge_seconds:.1f}" if r.merge_seconds is not None else "–"
        chosen = _params(r) if r.kind == "method" else ""
        lines.append(
            f"| {r.name} | {_fmt(r.mean_test)} | {_fmt(r.mean_normalized)} | {chosen} "
            f"| {r.search} | {merge_s} |"
        )
    for r in rows:
        if r.status != "ok":
            reason = " ".join(r.reason.split()).replace("|", "\\|")  # one table cell
            lines.append(f"| {r.name} | – | – | {r.status}: {reason} | | |")
    for label, attr in (
        ("Absolute test accuracy (%) per task", "test"),
        ("Normalized accuracy (%) per task", "normalized"),
    ):
        lines += [
            "",
            f"## {label}",
            "",
            "| method | " + " | ".join(tasks) + " | mean |",
            "|---|" + "---:|" * (len(tasks) + 1),
        ]
        for r in ranked:
            vals = getattr(r, attr)
            m = r.mean_test if attr == "test" else r.mean_normalized
            lines.append(f"| {r.name} | " + " | ".join(_fmt(vals.get(t)) for t in tasks) + f" | {_fmt(m)} |")
    return "\n".join(lines) + "\n"


def _annotated_heatmap(plt, values, cols, rows, *, fmt, dark_below, size, title, label, **imshow):
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(values, aspect="auto", **imshow)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, line in enumerate(values):
        for j, v in enumerate(line):
            color = "white" if v < dark_below else "black"
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    return fig


PLOTS_NEED = "plots need matplotlib: pip install 'alloykit[report]'"


def plots(
    out: Path, rows: Sequence[Row], tasks: Sequence[str], cosines: tuple[list[str], list[list[float]]] | None
) -> list[str]:
    """Draw the report's PNG plots into ``out``; returns their file names. Raises
    :class:`MissingDependencyError` (saying what to install) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(PLOTS_NEED) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    ok = [r for r in rows if r.status == "ok"]
    refs = [r for r in ok if r.kind == "reference"]
    methods = sorted((r for r in ok if r.kind == "method"), key=lambda r: -(r.mean_normalized or 0))
    shown = refs + methods

    grid = [[100 * r.test.get(t, float("nan")) for t in tasks] + [100 * (r.mean_test or 0)] for r in shown]
    size = (1.1 * len(tasks) + 4, 0.38 * len(shown) + 1.8)
    fig = _annotated_heatmap(
        plt, grid, [*tasks, "mean"], [r.name for r in shown], fmt=".1f", dark_below=70, size=size,
        title="Test accuracy per task", label="test accuracy (%)", cmap="viridis",
    )  # fmt: skip
    save(fig, "per_task_accuracy.png")

    bars = sorted(shown, key=lambda r: r.mean_normalized or 0)
    score = [100 * (r.mean_normalized or 0) for r in bars]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(bars) + 1.2))
    colors = ["#999999" if r.kind == "reference" else "#3b75af" for r in bars]
    ax.barh([r.name for r in bars], score, color=colors)
    for i, v in enumerate(score):
        ax.text(v + 0.3, i, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(max(0, min(score) - 5), max(105, max(score) + 5))
    ax.set_xlabel("mean normalized accuracy (%)")
    ax.set_title("Ranking (test)")
    save(fig, "normalized_ranking.png")

    if cosines is not None:
        names, mat = cosines
        side = 0.7 * len(names)
        fig = _annotated_heatmap(
            plt, mat, names, names, fmt=".2f", dark_below=0.6, size=(side + 2.5, side + 1.5),
            title="Task-vector cosine similarity", label="cosine", cmap="magma", vmin=0, vmax=1,
        )  # fmt: skip
        save(fig, "task_vector_cosine.png")

    sweeps = [r for r in methods if len(r.trials) > 1 and r.params]
    if sweeps:
        cols = 4
        nrows = (len(sweeps) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.5 * nrows), squeeze=False)
        for ax, r in zip(axes.flat, sweeps, strict=False):
            varying = [k for k in r.params if len({json.dumps(t["params"].get(k)) for t in r.trials}) > 1]
            key = varying[0] if varying else next(iter(r.params))
            pts = sorted((t["params"][key], 100 * t["score"]) for t in r.trials)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
            ax.axvline(r.params[key], color="#c44", lw=1, ls="--")
            ax.set_title(r.name, fontsize=9)
            ax.set_xlabel(key, fontsize=8)
            ax.set_ylabel("val. acc (%)", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(sweeps) :]:
            ax.axis("off")
        fig.suptitle("Hyperparameter search on validation (dashed: chosen)")
        save(fig, "validation_sweeps.png")
    return written


def write_report(
    out: str | os.PathLike,
    rows: Sequence[Row],
    tasks: Sequence[str],
    *,
    title: str,
    meta: Mapping[str, Any],
    cosines: tuple[list[str], list[list[float]]] | None = None,
    notes: Sequence[str] = (),
    draw: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write ``results.json`` and ``report.md`` into folder ``out``, then (with ``draw``) the
    plots, linked from ``report.md``. The results are on disk before anything is drawn: a plot
    that cannot be drawn (matplotlib missing) is reported through ``log`` and loses nothing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        **meta,
        "tasks": list(tasks),
        "rows": [r.to_json() for r in rows],
        "task_vector_cosine": {"tasks": cosines[0], "matrix": cosines[1]} if cosines else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(rows, tasks, title, notes)
    (out / "report.md").write_text(md)
    files = {"results": out / "results.json", "report": out / "report.md"}
    if draw:
        files.update(draw_plots(out, rows, tasks, cosines, log=log))
    return files


def draw_plots(
    out: str | os.PathLike,
    rows: Sequence[Row],
    tasks: Sequence[str],
    cosines: tuple[list[str], list[list[float]]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Draw the plots into ``out`` and link them from its ``report.md``. Without matplotlib:
    says what to install through ``log`` (raises when no ``log`` is given) and draws nothing."""
    out = Path(out)
    try:
        written = plots(out, rows, tasks, cosines)
    except MissingDependencyError as e:
        if log is None:
            raise
        log(f"  {e}; the results are in {out / 'results.json'} and {out / 'report.md'}")
        return {}
    report = out / "report.md"
    if report.exists():
        md = report.read_text()
        md += "\n" + "\n".join(f"![{name}]({name})" for name in written) + "\n"
        report.write_text(md)
    return {n: out / n for n in written}


def summary_table(rows: Sequence[Row]):
    """The main table (rich) for the terminal: mean absolute and normalized test accuracy."""
    from rich.table import Table

    t = Table(title="test accuracy, mean over tasks (hyperparameters chosen on validation)")
    for col in ("method", "abs. %", "norm. %", "chosen", "evals", "merge s"):
        t.add_column(col, justify="right" if col not in ("method", "chosen") else "left")
    ok = [r for r in rows if r.status == "ok"]
    ranked = [r for r in ok if r.kind == "reference"] + sorted(
        (r for r in ok if r.kind == "method"), key=lambda r: -(r.mean_normalized or 0)
    )
    for r in ranked:
        t.add_row(
            r.name,
            _fmt(r.mean_test),
            _fmt(r.mean_normalized),
            _params(r) if r.kind == "method" else "",
            str(len(r.trials)) if r.kind == "method" else "",
            f"{r.merge_seconds:.1f}" if r.merge_seconds is not None else "",
        )
    for r in rows:
        if r.status != "ok":
            t.add_row(r.name, "–", "–", f"{r.status}: {r.reason}", "", "")
    return t

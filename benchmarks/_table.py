"""Tables for the benchmark drivers: rich when installed, aligned plain text otherwise."""

from __future__ import annotations

from typing import Any

GiB = 2**30
RSS_TARGET = 1.5 * GiB


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def gib_flagged(n: float | None) -> str:
    """GiB, with " !" when over the 1.5 GiB target."""
    return gib(n) + ("" if (n or 0) <= RSS_TARGET else " !")


def print_rows(
    headers: list[str],
    body: list[list[str]],
    footnotes: list[str],
    title: str,
    left: tuple[str, ...] = (),
    width: int = 200,
) -> None:
    """Print ``body`` under ``headers``; columns named in ``left`` are left-aligned, the others
    right-aligned; ``footnotes`` go below the table."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
        for f in footnotes:
            print(f)
        return
    table = Table(title=title, caption="\n".join(footnotes), caption_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h in left else "right")
    for b in body:
        table.add_row(*b)
    Console(width=width).print(table)


def print_merge_table(rows: list[dict[str, Any]], footnotes: list[str], title: str) -> None:
    """bench_merge's table: one row per (method, workers), with its ratio to the floor."""
    headers = [
        "method",
        "workers",
        "threads",
        "wall s",
        "× floor",
        "target",
        "cpu s (usr+sys)",
        "peak RSS GiB (report)",
        "ru_maxrss GiB",
        "VmHWM GiB",
        "baseline GiB",
        "read GB/s",
        "passes",
        "in cache",
    ]
    body = []
    for r in rows:
        target = r.get("target")
        ratio = r.get("ratio")
        verdict = "-"
        if target is not None and ratio is not None:
            verdict = f"≤{target:g}× " + ("ok" if ratio <= target else "MISS")
        body.append(
            [
                r["label"],
                str(r["workers"]),
                str(r.get("torch_threads", "-")),
                f"{r['seconds']:.2f}",
                f"{ratio:.2f}" if ratio is not None else "-",
                verdict,
                f"{r['user_seconds']:.1f}+{r['sys_seconds']:.1f}" if "user_seconds" in r else "-",
                gib_flagged(r["peak_rss"]),
                gib_flagged(r["ru_maxrss"]),
                gib_flagged(r.get("vm_hwm")),
                gib(r["baseline_rss"]),
                f"{r['bytes_read'] / r['seconds'] / 1e9:.2f}",
                str(r.get("reduction_passes", 0)),
                "-" if r["cached"] is None else f"{r['cached']:.0%}",
            ]
        )
    print_rows(headers, body, footnotes, title, left=("method", "target"))

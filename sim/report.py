"""The simulator's outputs: ``results.json``, a Markdown table, a log-log plot.

The headline per run is the worst wait: the longest any agent waited from its
arrival until it held the package. In a storm that is the time-to-all; in
waves and bursts the time-to-all also counts the schedule (50 s, 23 s), which
says nothing about the fan-out, so both are written and the worst wait is
plotted and compared with the solo time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.model import Outcome

MB = 10**6


def rows(outcomes: Sequence[Outcome], solo: dict[int, float]) -> list[dict[str, Any]]:
    """One JSON-ready row per run, with its solo time and ratio."""
    out = []
    for o in outcomes:
        row = o.row()
        row["solo_s"] = solo[o.params.size]
        row["ratio_to_solo"] = o.wait_max / row["solo_s"]
        out.append(row)
    return out


def write_json(path: Path, args: dict[str, Any], table: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"args": args, "runs": table}, indent=1, default=str) + "\n")


def size_text(n: int) -> str:
    return f"{n / MB:g} MB" if n % MB == 0 else f"{n / (1 << 20):g} MiB"


def markdown(table: list[dict[str, Any]]) -> str:
    """A table per model: N, size, K, solo, time-to-all, waits, ratio, upload."""
    head = (
        "| N | size | K | solo | time-to-all | worst wait | p50 wait | worst ÷ solo "
        "| largest upload | depth | origin GETs |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    parts = []
    for model in dict.fromkeys(r["model"] for r in table):
        lines = [_line(r) for r in table if r["model"] == model]
        parts.append(f"### {model}\n\n" + head + "".join(lines))
    return "\n".join(parts)


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['n']:,} | {size_text(r['size'])} | {r['k']} | {_s(r['solo_s'])} "
        f"| {_s(r['time_to_all'])} | {_s(r['wait_max'])} | {_s(r['wait_p50'])} "
        f"| {r['ratio_to_solo']:,.1f}× | {r['largest_upload_pkgs']:,.0f} pkg "
        f"| {r['depth']} | {r['origin_gets']} |\n"
    )


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def plot(path: Path, table: list[dict[str, Any]]) -> None:
    """Worst wait against N, log-log: one panel per model, a line per (size, K)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        runs = [r for r in table if r["model"] == model]
        for size, k in dict.fromkeys((r["size"], r["k"]) for r in runs):
            line = sorted((r["n"], r["wait_max"]) for r in runs if (r["size"], r["k"]) == (size, k))
            style = "--" if k == 0 else "-"
            label = f"{size_text(size)}, K={k}" + (" (owner only)" if k == 0 else "")
            ax.plot(*zip(*line, strict=True), style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("hosts N")
        ax.set_ylabel("worst wait until held (s)" + (" = time-to-all" if model == "storm" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

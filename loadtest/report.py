"""The Markdown report of a run: per scenario, a table comparing cachesvc with
the two baselines (origin directly, nginx), and a latency-over-time plot.

Latencies are to the last byte, from the per-fetch samples the locustfile
writes (exact percentiles, not locust's rounded buckets). Warm-up requests
(``warm``) are reported apart from the traffic they precede.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from loadtest.run import TargetRun
    from loadtest.scenarios import Scenario

MiB = 1 << 20
WARM_NAMES = ("warm-up", "warm status")


@dataclass(frozen=True)
class Figures:
    """One target's numbers in one scenario."""

    target: str
    fetches: int
    p50: float
    p99: float
    worst: float
    distinct: int
    origin_gets: int
    origin_bytes: int
    errors: int
    tiers: str
    warm_s: float | None
    notes: tuple[str, ...]


def read_samples(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def locust_failures(prefix: Path) -> int:
    """Failures of all requests, from locust's own ``_stats.csv`` (0 if absent)."""
    stats = prefix.with_name(prefix.name + "_stats.csv")
    if not stats.exists():
        return 0
    with open(stats, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    return int(rows[0]["Failure Count"]) if rows else 0


def figures(run: TargetRun) -> Figures:
    rows = read_samples(run.samples)
    traffic = [r for r in rows if r["name"] not in WARM_NAMES]
    warm = [r for r in rows if r["name"] in WARM_NAMES]
    lat = np.array([float(r["latency_ms"]) for r in traffic]) if traffic else np.zeros(1)
    sample_errors = [r["error"] for r in rows if r["error"]]
    notes = tuple(dict.fromkeys(sample_errors))[:3]
    if run.exit_code not in (0, 1):
        notes += (f"locust ended with {run.exit_code} (killed after its time bound)",)
    return Figures(
        target=run.target,
        fetches=len(traffic),
        p50=float(np.percentile(lat, 50)),
        p99=float(np.percentile(lat, 99)),
        worst=float(lat.max()),
        distinct=len({r["hex"] for r in traffic}),
        origin_gets=run.origin_gets,
        origin_bytes=run.origin_bytes,
        errors=max(len(sample_errors), locust_failures(run.csv_prefix)),
        tiers=", ".join(
            f"{k} {n}" for k, n in sorted(Counter(r["tier"] or "direct" for r in traffic).items())
        ),
        warm_s=sum(float(r["latency_ms"]) for r in warm) / 1000 if warm else None,
        notes=notes,
    )


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base > 0 else "–"


TABLE_HEAD = (
    "| target | fetches | p50 ms | p99 ms | max ms | p50 ÷ origin | p99 ÷ origin "
    "| origin GETs | distinct pkgs | origin GETs / pkg | origin MiB | errors | served by |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
)


def table(rows: list[Figures]) -> str:
    base = next((f for f in rows if f.target == "origin"), None)
    out = TABLE_HEAD
    for f in rows:
        per_pkg = f"{f.origin_gets / f.distinct:.2f}" if f.distinct else "–"
        r50 = ratio(f.p50, base.p50) if base else "–"
        r99 = ratio(f.p99, base.p99) if base else "–"
        out += (
            f"| {f.target} | {f.fetches} | {f.p50:.1f} | {f.p99:.1f} | {f.worst:.1f} | {r50} "
            f"| {r99} | {f.origin_gets} | {f.distinct} | {per_pkg} "
            f"| {f.origin_bytes / MiB:.1f} | {f.errors} | {f.tiers or '–'} |\n"
        )
    return out


def plot(path: Path, title: str, runs: list[TargetRun]) -> None:
    """Latency to last byte of every fetch over time, one panel per target."""
    fig, axes = plt.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)
    fig.set_size_inches(9, 2.2 * len(runs) + 0.8)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        rows = [r for r in read_samples(run.samples) if r["name"] not in WARM_NAMES]
        if rows:
            t0 = min(float(r["start"]) for r in read_samples(run.samples))
            xs = [float(r["start"]) + float(r["latency_ms"]) / 1000 - t0 for r in rows]
            ys = [max(float(r["latency_ms"]), 0.1) for r in rows]
            ax.scatter(xs, ys, s=6, alpha=0.6)
        ax.set_yscale("log")
        ax.set_ylabel(f"{run.target}\nms")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the target's run started (at the fetch's last byte)")
    fig.suptitle(f"{title}: latency to last byte per fetch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def scenario_section(
    sc: Scenario, runs: list[TargetRun], run_dir: Path
) -> tuple[str, list[Figures]]:
    """The Markdown of one scenario and its figures per target."""
    rows = [figures(r) for r in runs]
    png = run_dir / sc.name / "latency.png"
    plot(png, sc.name, runs)
    sizes = f"{len(sc.sizes)} package(s), {min(sc.sizes) / MiB:.2f}–{max(sc.sizes) / MiB:.2f} MiB"
    text = f"## {sc.name}\n\n{sc.models}\n\n`{sc.user}` `{' '.join(sc.args)}`; {sizes}.\n\n"
    text += table(rows) + "\n"
    for f in rows:
        if f.warm_s is not None:
            text += f"- {f.target}: warm-up took {f.warm_s:.2f} s before the traffic.\n"
        for note in f.notes:
            text += f"- **{f.target}: {note}**\n"
    csvs = ", ".join(f"[{r.target}]({sc.name}/{r.csv_prefix.name}_stats.csv)" for r in runs)
    text += f"\n![{sc.name} latency]({sc.name}/latency.png)\n\nlocust CSV: {csvs}\n\n"
    return text, rows


HEADER = """# cachesvc load test: {name}

{when}; {mode}; {cores} cores, everything on 127.0.0.1.

Stack: moto (S3) ← a counting proxy (origin GETs and bytes below are its
counts) ← 3 `cachesvc peer` + 2 `cachesvc agent`; nginx {nginx} in front of the
same proxy. Targets run one after another in the order origin, nginx, cachesvc;
cachesvc users are spread over both agents. Latency is to the last byte of
each fetch; ratios are target ÷ origin-direct (smaller is better).

"""


def write_report(
    run_dir: Path,
    chosen: list[Scenario],
    results: list[TargetRun],
    quick: bool,
) -> Path:
    """Write ``report.md`` (and one PNG per scenario) into ``run_dir``; returns its path."""
    text = HEADER.format(
        name=run_dir.name,
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
        mode="quick (small packages, seconds-long runs)" if quick else "full run",
        cores=os.cpu_count(),
        nginx="(worker_processes 1, proxy_cache_lock on, lock timeout 120 s)",
    )
    numbers: dict[str, dict[str, Any]] = {}
    for sc in chosen:
        section, rows = scenario_section(sc, [r for r in results if r.scenario == sc.name], run_dir)
        text += section
        numbers[sc.name] = {f.target: asdict(f) for f in rows}
    total = sum(t["errors"] for by_target in numbers.values() for t in by_target.values())
    text += f"Errors in all scenarios: **{total}**.\n"
    (run_dir / "results.json").write_text(json.dumps(numbers, indent=1))
    path = run_dir / "report.md"
    path.write_text(text)
    return path

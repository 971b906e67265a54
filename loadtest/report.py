"""The Markdown report of a run, written to be read without its author: per
scenario, the settings actually used, a table comparing cachesvc with the two
baselines (origin directly, nginx), the same fetches split by where they were
served from (hits and misses apart), a line per target on why its figures look
the way they do (:mod:`loadtest.explain`), and a latency-over-time plot
(:mod:`loadtest.plot`). A quick run says so in the title, in every scenario's
settings and in every table row.

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

import numpy as np

from loadtest.explain import why
from loadtest.plot import Fetch, Panel, plot, tier_class

if TYPE_CHECKING:
    from loadtest.run import TargetRun
    from loadtest.scenarios import Scenario

MiB = 1 << 20
KiB = 1 << 10
WARM_NAMES = ("warm-up", "warm status")
ORIGIN_KINDS = {
    "moto": "moto (an S3 mock: any credentials, objects in memory)",
    "seaweedfs": "SeaweedFS (a real S3 store: signatures checked, objects on disk)",
}


@dataclass(frozen=True)
class RunInfo:
    """How the run was set up, for the report's settings."""

    quick: bool
    origin_kind: str  # a key of ORIGIN_KINDS
    targets: dict[str, tuple[tuple[str, ...], str]]  # name → (base URLs, path template)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


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
    by_tier: tuple[tuple[str, int, float, float], ...] = ()  # (tier, fetches, p50, p99)


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
        by_tier=split_by_tier(traffic),
    )


def split_by_tier(traffic: list[dict[str, str]]) -> tuple[tuple[str, int, float, float], ...]:
    """Fetches, p50 and p99 per tier that served them, most fetches first."""
    groups: dict[str, list[float]] = {}
    for r in traffic:
        groups.setdefault(r["tier"] or "direct", []).append(float(r["latency_ms"]))
    return tuple(
        (tier, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
        for tier, ms in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    )


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base > 0 else "–"


TABLE_HEAD = (
    "| target | fetches | p50 ms | p99 ms | max ms | p50 ÷ origin | p99 ÷ origin "
    "| origin GETs | distinct pkgs | origin GETs / pkg | origin MiB | errors | served by | run |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
)


def table(rows: list[Figures], mode: str) -> str:
    base = next((f for f in rows if f.target == "origin"), None)
    out = TABLE_HEAD
    for f in rows:
        per_pkg = f"{f.origin_gets / f.distinct:.2f}" if f.distinct else "–"
        r50 = ratio(f.p50, base.p50) if base else "–"
        r99 = ratio(f.p99, base.p99) if base else "–"
        out += (
            f"| {f.target} | {f.fetches} | {f.p50:.1f} | {f.p99:.1f} | {f.worst:.1f} | {r50} "
            f"| {r99} | {f.origin_gets} | {f.distinct} | {per_pkg} "
            f"| {f.origin_bytes / MiB:.1f} | {f.errors} | {f.tiers or '–'} | {mode} |\n"
        )
    return out


def tier_table(rows: list[Figures]) -> str:
    """The same fetches split by where they were served from: hits and misses apart."""
    out = "| target | served by | what that is | fetches | p50 ms | p99 ms |\n"
    out += "|---|---|---|---:|---:|---:|\n"
    for f in rows:
        for tier, n, p50, p99 in f.by_tier:
            what = tier_class(tier)[0]
            out += f"| {f.target} | {tier} | {what} | {n} | {p50:.1f} | {p99:.1f} |\n"
    return out


def size_text(n: float) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / KiB:.0f} KiB"


def settings(sc: Scenario, info: RunInfo) -> str:
    """The settings this scenario actually ran with, as a two-column table."""
    low, high = min(sc.sizes), max(sc.sizes)
    sizes = f"{len(sc.sizes)} of {size_text(low)}"
    if low != high:
        sizes = f"{len(sc.sizes)}, {size_text(low)} to {size_text(high)}"
    targets = "<br>".join(
        f"{name}: {', '.join(hosts)} `{path}`" for name, (hosts, path) in info.targets.items()
    )
    quick = " (small packages, seconds-long runs: not for figures)" if info.quick else ""
    rows = [
        ("run", f"{info.mode}{quick}"),
        ("packages", f"{sizes} (random bytes, incompressible)"),
        ("users and shape", sc.shape()),
        ("planned duration", f"{sc.run_s:g} s, then running fetches may finish"),
        ("locust", f"`{sc.user} {' '.join(sc.args)}`"),
        ("targets", targets),
        ("origin", f"{ORIGIN_KINDS[info.origin_kind]}, behind the counting proxy"),
    ]
    return "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def panels(runs: list[TargetRun]) -> list[Panel]:
    """Each target's traffic fetches, timed from its own first request."""
    out = []
    for run in runs:
        rows = read_samples(run.samples)
        t0 = min((float(r["start"]) for r in rows), default=0.0)
        fetches = [
            Fetch(
                float(r["start"]) + float(r["latency_ms"]) / 1000 - t0,
                max(float(r["latency_ms"]), 0.1),
                r["tier"],
            )
            for r in rows
            if r["name"] not in WARM_NAMES
        ]
        out.append(Panel(run.target, fetches))
    return out


def scenario_section(
    sc: Scenario, runs: list[TargetRun], run_dir: Path, info: RunInfo
) -> tuple[str, list[Figures]]:
    """The Markdown of one scenario and its figures per target."""
    rows = [figures(r) for r in runs]
    title = f"{sc.name}{' (QUICK run)' if info.quick else ''}: latency to last byte per fetch"
    plot(run_dir / sc.name / "latency.png", f"{title}, {info.origin_kind} origin", panels(runs))
    text = f"## {sc.name}\n\n{sc.models}\n\n" + settings(sc, info) + "\n"
    text += table(rows, info.mode) + "\n" + tier_table(rows) + "\n"
    text += "".join(f"- {line}\n" for line in why(sc.name, rows))
    for f in rows:
        for note in f.notes:
            text += f"- **{f.target}: {note}**\n"
    csvs = ", ".join(f"[{r.target}]({sc.name}/{r.csv_prefix.name}_stats.csv)" for r in runs)
    text += f"\n![{sc.name} latency]({sc.name}/latency.png)\n\nlocust CSV: {csvs}\n\n"
    return text, rows


HEADER = """# cachesvc load test: {name}{quick}

{when}; {mode}; {cores} cores, everything on 127.0.0.1.

Stack: {origin} ← a counting proxy (origin GETs and bytes below are its
counts) ← 3 `cachesvc peer` + 2 `cachesvc agent`; nginx {nginx} in front of the
same proxy. Targets run one after another in the order origin, nginx, cachesvc;
cachesvc users are spread over both agents. Latency is to the last byte of
each fetch; ratios are target ÷ origin-direct (smaller is better). In the
plots, colour says where each fetch was served from; the dashed and dotted
lines are p50 and p99.

"""


def write_report(
    run_dir: Path,
    chosen: list[Scenario],
    results: list[TargetRun],
    info: RunInfo,
) -> Path:
    """Write ``report.md`` (and one PNG per scenario) into ``run_dir``; returns its path."""
    text = HEADER.format(
        name=run_dir.name,
        quick=" (QUICK run: not for figures)" if info.quick else "",
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
        mode="quick (small packages, seconds-long runs)" if info.quick else "full run",
        cores=os.cpu_count(),
        origin=ORIGIN_KINDS[info.origin_kind],
        nginx="(worker_processes 1, proxy_cache_lock on, lock timeout 120 s)",
    )
    numbers: dict[str, dict[str, Any]] = {}
    for sc in chosen:
        runs = [r for r in results if r.scenario == sc.name]
        section, rows = scenario_section(sc, runs, run_dir, info)
        text += section
        numbers[sc.name] = {f.target: asdict(f) for f in rows}
    total = sum(t["errors"] for by_target in numbers.values() for t in by_target.values())
    text += f"Errors in all scenarios: **{total}**.\n"
    (run_dir / "results.json").write_text(json.dumps(numbers, indent=1))
    path = run_dir / "report.md"
    path.write_text(text)
    return path

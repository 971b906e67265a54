"""What ``python -m loadtest fanout`` measured, the simulator's prediction for
the same N, K, E and S beside it, and the checks of the fan-out goals.

The simulator is calibrated only with physical quantities measured in the
same run: the origin's time to first byte and bandwidth (one GET of a
calibration package through the proxy) and the per-hop latency (the solo
fetch's time to first byte minus the origin's). Its chunk is the egress
bucket's slice (:data:`cachesvc.serve.egress.SLICE`), the unit in which a host
sends; nothing is fitted to the storm's own result.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cachesvc.serve.egress import SLICE
from sim.model import Params, simulate

SIM_ERROR_NS = (8, 16, 24)  # where the prediction must be within 25 %
RATIO_NS = (16, 24)  # where all-hold must be within 4 × solo (K = default)


@dataclass
class Row:
    """One storm: N agents, fan-out K."""

    n: int
    k: int
    size: int
    egress: float | None  # bytes/s in force on every host; None: unlimited
    solo_s: float  # one agent alone: until its store held the package
    holds_s: list[float]  # per agent, from the storm's start
    holds_from: list[str]  # "store" (blob mtime) or "client" (last byte)
    client_s: list[float]  # per agent: its local client's last byte
    origin_gets: int
    largest_upload: int  # bytes, to other hosts, of the busiest host
    uploader: str
    upload_from: str  # the metric it was read from
    bad_bodies: int
    errors: list[str]
    calibration: dict[str, float]
    sim: dict[str, float] | None = field(default=None)
    agent_upload: int = 0  # bytes agents sent to other agents (fan-out at work)

    @property
    def hold_p50(self) -> float:
        return statistics.median(self.holds_s)

    @property
    def hold_max(self) -> float:
        return max(self.holds_s)

    @property
    def ratio(self) -> float:
        return self.hold_max / self.solo_s

    @property
    def missing_holds(self) -> bool:
        return any(t != t for t in self.holds_s)  # NaN: the agent never answered

    @property
    def sim_error(self) -> float | None:
        return None if self.sim is None else self.sim["hold_max_s"] / self.hold_max - 1

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(hold_p50_s=self.hold_p50, hold_max_s=self.hold_max, ratio_to_solo=self.ratio)
        out.update(largest_upload_pkgs=self.largest_upload / self.size, sim_error=self.sim_error)
        return out


def predict(row: Row) -> dict[str, float]:
    """The simulator's storm for this row's N, K, E, S and measured latencies."""
    assert row.egress is not None, "predictions need the egress limit in force"
    cal = row.calibration
    p = Params(
        n=row.n,
        size=row.size,
        egress=row.egress,
        k=row.k,
        chunk=SLICE,
        hop_latency=cal["hop_latency_s"],
        origin_latency=cal["origin_ttfb_s"],
        origin_bandwidth=cal["origin_Bps"],
    )
    storm, solo = simulate(p), simulate(p.solo())
    return {
        "solo_s": solo.wait_max,
        "hold_p50_s": storm.wait_p50,
        "hold_max_s": storm.wait_max,
        "largest_upload_pkgs": storm.largest_upload / row.size,
    }


def markdown(rows: list[Row]) -> str:
    head = (
        "| N | K | solo | all hold p50 | all hold max | max ÷ solo | origin GETs "
        "| largest upload | bad bodies | sim: solo | sim: max | sim error |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(_line(r) for r in rows)


def _line(r: Row) -> str:
    sim = r.sim or {}
    error = "n/a" if r.sim_error is None else f"{r.sim_error:+.0%}"
    return (
        f"| {r.n} | {r.k} | {_s(r.solo_s)} | {_s(r.hold_p50)} | {_s(r.hold_max)} "
        f"| {r.ratio:.1f}× | {r.origin_gets} | {r.largest_upload / r.size:.1f} pkg "
        f"({r.uploader}) | {r.bad_bodies} | {_s(sim.get('solo_s'))} "
        f"| {_s(sim.get('hold_max_s'))} | {error} |\n"
    )


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def checks(rows: list[Row], default_k: int) -> list[tuple[str, bool]]:
    """The fan-out goals' figures, each with whether this run met it."""
    out = []
    for r in rows:
        name = f"N={r.n} K={r.k}"
        out.append((f"{name}: 1 origin GET, 0 bad bodies", r.origin_gets == 1 and not r.bad_bodies))
        if r.k == default_k and r.n in RATIO_NS:
            out.append((f"{name}: all hold within 4× solo ({r.ratio:.1f}×)", r.ratio <= 4))
        if r.k > 0 and "unknown" not in r.upload_from:
            pkgs = r.largest_upload / r.size
            out.append((f"{name}: no host uploads more than 5 packages ({pkgs:.1f})", pkgs <= 5))
        if r.sim_error is not None and r.n in SIM_ERROR_NS:
            within = abs(r.sim_error) <= 0.25
            out.append((f"{name}: simulator within 25 % ({r.sim_error:+.0%})", within))
    return out


def write_outputs(out: Path, plan: Any, rows: list[Row], notes: list[str], default_k: int) -> Path:
    """``results.json`` and ``report.md``; returns the report's path."""
    data = {"plan": {k: str(v) for k, v in vars(plan).items()}, "notes": notes}
    data["runs"] = [r.to_json() for r in rows]
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Fan-out emulation: {plan.size / (1 << 20):g} MiB, egress {plan.egress_text}\n"]
    lines += [markdown(rows), "\n## Checks\n"]
    lines += [f"- {'PASS' if ok else 'MISS'} {text}" for text, ok in checks(rows, default_k)]
    sources = sorted({r.upload_from for r in rows})
    notes = [*notes, *(f"largest upload from {s}" for s in sources)]
    lines += ["\n## Notes\n", *[f"- {n}" for n in notes], _method()]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _method() -> str:
    return (
        "- all hold: from the storm's start until each agent's store held the package "
        "(blob file mtime); solo: the same for one agent alone, a fresh package.\n"
        "- sim: `python -m sim`'s model with this run's N, K, E, S, chunk = the egress "
        "slice, and the hop latency, origin TTFB and bandwidth measured in this run.\n"
        "- 2 shared cores run moto, the proxy, every cachesvc process and the client."
    )

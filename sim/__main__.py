"""``python -m sim``: the fan-out policy at AZ scale, as a grid of simulated runs.

    .venv/bin/python -m sim --n 100,1000,5000 --size 50MB,500MB \\
        --bandwidth 10Gbit --k 0,2 --model storm,waves,burst --out sim/out

writes ``results.json``, ``table.md`` and ``fanout.png`` (worst wait against
N, log-log, K = 0 against the others) into ``--out`` and prints the table.
Bandwidths take bits (``10Gbit``, ``25Gbps``) or bytes per second (``40MiB``);
latencies take ``ms``, ``us`` or seconds.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cachesvc.config import parse_size
from cachesvc.serve.egress import parse_rate
from sim.model import MODELS, Outcome, Params, simulate
from sim.report import markdown, plot, rows, write_json

_BIT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
T = TypeVar("T")


def parse_bandwidth(text: str) -> float:
    """``10Gbit`` / ``10Gbps`` → 1.25e9 bytes/s; sizes (``40MiB``) are bytes/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:bit|bps|bit/s)\s*", text, re.IGNORECASE)
    if m is not None:
        return float(m[1]) * _BIT_UNITS[m[2].lower()] / 8
    rate = parse_rate(text)
    if rate is None:
        raise ValueError(f"bandwidth {text!r}: must be more than 0")
    return rate


def parse_seconds(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|ms|us|)\s*", text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration (examples: 0.5ms, 20ms, 0.001)")
    return float(m[1]) * _TIME_UNITS[m[2]]


def _list(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=_list(int), default=[100, 1000, 5000], help="agents, e.g. 100,1000")
    p.add_argument("--size", type=_list(lambda t: parse_size(t)), default=[50 * 10**6, 500 * 10**6])
    p.add_argument("--k", type=_list(int), default=[0, 2], help="fan-out K (0: owner only)")
    p.add_argument("--model", type=_list(str), default=list(MODELS), help=",".join(MODELS))
    p.add_argument("--bandwidth", type=parse_bandwidth, default=parse_bandwidth("10Gbit"))
    p.add_argument("--origin-bandwidth", type=parse_bandwidth, help="default: --bandwidth")
    p.add_argument("--chunk", type=parse_size, default=1 << 20, help="cut-through unit")
    p.add_argument("--hop-latency", type=parse_seconds, default=0.0005, help="per request")
    p.add_argument("--origin-latency", type=parse_seconds, default=0.020, help="first byte")
    p.add_argument("--out", type=Path, default=Path("sim/out") / time.strftime("%Y%m%d-%H%M%S"))
    args = p.parse_args(argv)
    unknown = set(args.model) - set(MODELS)
    if unknown:
        p.error(f"--model: unknown {sorted(unknown)}; choose from {list(MODELS)}")
    return args


def grid(args: argparse.Namespace) -> tuple[list[Outcome], dict[int, float]]:
    """Every (model, N, size, K) run, and the solo time of each size."""
    outcomes, solo = [], {}
    for size in args.size:
        solo[size] = simulate(_params(args, 1, size, args.k[-1], "storm")).wait_max
    for model in args.model:
        for n in args.n:
            for size in args.size:
                for k in args.k:
                    out = simulate(_params(args, n, size, k, model))
                    outcomes.append(out)
                    _progress(out)
    return outcomes, solo


def _progress(out: Outcome) -> None:
    p = out.params
    text = f"{p.model} N={p.n} S={p.size} K={p.k}: worst wait {out.wait_max:.3f} s"
    print(f"sim: {text} ({out.events:,} events, {out.wall_s:.1f} s)", file=sys.stderr)


def _params(args: argparse.Namespace, n: int, size: int, k: int, model: str) -> Params:
    return Params(
        n=n,
        size=size,
        egress=args.bandwidth,
        k=k,
        model=model,
        chunk=args.chunk,
        hop_latency=args.hop_latency,
        origin_latency=args.origin_latency,
        origin_bandwidth=args.origin_bandwidth,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes, solo = grid(args)
    table = rows(outcomes, solo)
    write_json(args.out / "results.json", vars(args), table)
    text = markdown(table)
    (args.out / "table.md").write_text(text)
    plot(args.out / "fanout.png", table)
    print(text)
    print(f"sim: wrote {args.out}/results.json, table.md, fanout.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m loadtest run [--scenario NAME|all] [--quick] [--origin STORE] [--out DIR] ...``

Starts a local stack (moto or SeaweedFS, a counting proxy, 3 peers, 2 agents, nginx), seeds
it, runs each scenario with locust against the origin, nginx and cachesvc, and
writes ``loadtest/out/<run>/report.md`` with CSVs and one plot per scenario.
Exits 1 when any request failed. Where nginx is not on PATH and cannot be
installed (not root, no apt-get), the run leaves that baseline out and says why.

``python -m loadtest fanout [--n 4,8,16,24] [--k 0,2] [--size 16MiB]
[--egress-limit 40MiB] [--out DIR]`` is the fan-out emulation: see
:mod:`loadtest.fanout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from loadtest import fanout
from loadtest.nginx import nginx_binary
from loadtest.run import TARGET_ORDER, run
from loadtest.scenarios import scenarios
from loadtest.stack import ORIGINS
from loadtest.tools import ToolUnavailable

OUT = Path(__file__).with_name("out")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[2])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="run scenarios against a local stack and write a report")
    names = [*scenarios(), "all"]
    cmd.add_argument("--scenario", choices=names, action="append", help="repeatable (default all)")
    cmd.add_argument("--quick", action="store_true", help="small packages, runs of seconds")
    cmd.add_argument("--out", type=Path, help="run directory (default loadtest/out/<time>)")
    cmd.add_argument(
        "--targets",
        default=",".join(TARGET_ORDER),
        help="comma-separated, of origin,nginx,cachesvc",
    )
    cmd.add_argument(
        "--origin", choices=ORIGINS, default="moto", help="the S3 store (default moto, a mock)"
    )
    fanout.add_parser(sub)
    return parser.parse_args(argv)


def available(targets: tuple[str, ...]) -> tuple[str, ...]:
    """``targets`` without nginx when it cannot be had, saying why on stderr."""
    if "nginx" not in targets:
        return targets
    try:
        nginx_binary()
    except ToolUnavailable as exc:
        print(f"loadtest: leaving out the nginx baseline: {exc}", file=sys.stderr)
        return tuple(t for t in targets if t != "nginx")
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "fanout":
        return fanout.main(args)
    chosen = args.scenario or ["all"]
    names = list(scenarios()) if "all" in chosen else list(dict.fromkeys(chosen))
    targets = available(tuple(t for t in TARGET_ORDER if t in args.targets.split(",")))
    run_dir = args.out or OUT / time.strftime("%Y%m%d-%H%M%S")
    report = asyncio.run(run(names, args.quick, run_dir, targets, args.origin))
    print(report.read_text())
    print(f"report: {report}")
    numbers = json.loads(report.with_name("results.json").read_text())
    errors = sum(t["errors"] for by_target in numbers.values() for t in by_target.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

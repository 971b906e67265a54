"""Small packages under Zipf popularity: cachesvc against nginx ``proxy_cache``.

Command (from the repository root; installs nginx when missing and allowed)::

    .venv/bin/python bench/zipf.py [--packages 2000] [--size 64KiB] [--requests 20000]
                                   [--connections 32] [--reps 3]

The stack of ``python -m loadtest`` (``loadtest/stack.py``): the moto S3 server
behind the counting proxy, 3 ``cachesvc peer`` and 2 ``cachesvc agent``
processes, and nginx (one worker, ``proxy_cache`` with ``proxy_cache_lock``,
``sendfile`` and ``tcp_nopush`` off: its best setting for small proxied
objects, see ``loadtest/nginx.py``) in front of the same proxy. Per repetition:
a fresh set of ``--packages`` random packages is seeded; one trace of
``--requests`` paths is drawn with Zipf(1.1) popularity (fixed seed); then, for
each target in turn, starting from an empty cache for that set, a keep-alive
client process (``bench/zipfclient.py``: ``--connections`` connections, split
over the two agents for cachesvc) replays the trace as fast as answers come.

Prints per target: requests per second, latency p50 and p99 (request written
to last body byte), origin GETs (the proxy's count: the goal is one per
distinct package touched), and who answered (``X-Cache-Tier`` / nginx's
``X-Cache-Status``); medians over the repetitions, and the ratios cachesvc /
nginx with the issue's goals: throughput >= 0.8x, p99 <= 1.2x. Writes
``bench/out/zipf.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import cpu_seconds, publish_report  # noqa: E402
from cachesvc.config import parse_size  # noqa: E402
from loadtest.seed import seed  # noqa: E402
from loadtest.stack import BUCKET, LocalStack, local_stack  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZIPF_S = 1.1


def zipf_trace(n: int, requests: int, rng: random.Random) -> list[int]:
    """``requests`` ranks in ``[0, n)``; rank r drawn with weight 1 / (r + 1) ** s."""
    weights = [1 / (r + 1) ** ZIPF_S for r in range(n)]
    order = list(range(n))
    rng.shuffle(order)  # popularity independent of publish order
    return [order[r] for r in rng.choices(range(n), weights=weights, k=requests)]


def cpu_by_role(stack: LocalStack) -> dict[str, float]:
    """CPU seconds so far of the agents, the peers, and this process (the
    counting proxy in front of the origin, which both targets go through)."""
    out = {"agents": 0.0, "peers": 0.0}
    for child in stack.children:
        role = "agents" if child.name in stack.agents else "peers"
        out[role] += cpu_seconds(child.proc.pid)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["proxy"] = usage.ru_utime + usage.ru_stime
    return out


def start_profilers(stack: LocalStack, out: Path | None, tag: str) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` on every cachesvc process while the trace replays
    (``--profile DIR``): raw stacks, one file per process, threads included."""
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "-r",
                "250",
                "-f",
                "raw",
                "--threads",
                "-p",
                str(child.proc.pid),
                "-o",
                str(out / f"{tag}-{i}.raw"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for i, child in enumerate(stack.children)
    ]


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for proc in profilers:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for proc in profilers:
        proc.wait(timeout=60)


def replay(trace: list[str], connections: int, hosts: list[str], work: Path) -> dict[str, Any]:
    path = work / "trace.json"
    path.write_text(json.dumps(trace))
    argv = [sys.executable, str(ROOT / "bench" / "zipfclient.py"), str(path), str(connections)]
    done = subprocess.run(
        [*argv, ",".join(hosts)], check=True, capture_output=True, text=True, timeout=1800
    )
    return dict(json.loads(done.stdout))


async def one_rep(
    stack: LocalStack, rep: int, args: argparse.Namespace, work: Path
) -> dict[str, dict[str, Any]]:
    sizes = (args.size,) * args.packages
    manifest = await seed(BUCKET, stack.store_url, {f"zipf{rep}": sizes}, work)
    hexes = [p["hex"] for p in manifest[f"zipf{rep}"]]
    ranks = zipf_trace(len(hexes), args.requests, random.Random(rep))
    targets = {"nginx": stack.targets().get("nginx"), "cachesvc": stack.targets()["cachesvc"]}
    out: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        if target is None:
            continue
        trace = [target.path_template.format(hex=hexes[r]) for r in ranks]
        before, cpu = stack.proxy.blob_gets(), cpu_by_role(stack)
        profilers = (
            start_profilers(stack, args.profile, f"{name}-rep{rep}") if name == "cachesvc" else []
        )
        result = await asyncio.to_thread(replay, trace, args.connections, list(target.hosts), work)
        stop_profilers(profilers)
        result["origin_gets"] = stack.proxy.blob_gets() - before
        result["cpu_s"] = {k: round(v - cpu[k], 2) for k, v in cpu_by_role(stack).items()}
        result["distinct"] = len(set(ranks))
        out[name] = result
        print(f"  rep {rep} {name}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.1f} ms, "
              f"origin GETs {result['origin_gets']}/{result['distinct']}, {result['tiers']}, "
              f"CPU s {result['cpu_s']}",
              flush=True)  # fmt: skip
    return out


def report(reps: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    def med(target: str, key: str) -> float:
        values: list[float] = [r[target][key] for r in reps if target in r]
        return statistics.median(values)

    lines = [
        f"{args.packages} packages of {args.size} B, Zipf({ZIPF_S}), {args.requests} requests, "
        f"{args.connections} keep-alive connections; medians of {len(reps)} repetitions, "
        "each from empty caches.",
        "",
        "| target | req/s | p50 ms | p99 ms | origin GETs / distinct | errors |",
        "|---|---|---|---|---|---|",
    ]
    names = [t for t in ("nginx", "cachesvc") if any(t in r for r in reps)]
    for t in names:
        gets = "; ".join(f"{r[t]['origin_gets']}/{r[t]['distinct']}" for r in reps)
        errors = sum(r[t]["errors"] for r in reps)
        lines.append(f"| {t} | {med(t, 'rps'):.0f} | {med(t, 'p50_ms'):.1f} | "
                     f"{med(t, 'p99_ms'):.1f} | {gets} | {errors} |")  # fmt: skip
    if names == ["nginx", "cachesvc"]:
        rps = med("cachesvc", "rps") / med("nginx", "rps")
        p99 = med("cachesvc", "p99_ms") / med("nginx", "p99_ms")
        lines += [
            "",
            f"cachesvc / nginx: throughput {rps:.2f}x (goal >= 0.8x: "
            f"{'met' if rps >= 0.8 else 'MISSED'}), p99 {p99:.2f}x (goal <= 1.2x: "
            f"{'met' if p99 <= 1.2 else 'MISSED'}).",
        ]
    return lines


async def amain(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="cachesvc-zipf-") as tmp:
        work = Path(tmp)
        reps = []
        for rep in range(args.reps):  # a fresh stack: every target starts from empty caches
            async with local_stack(work / f"logs{rep}") as stack:
                reps.append(await one_rep(stack, rep, args, work))
    return report(reps, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--packages", type=int, default=2000, help="distinct packages (default 2000)"
    )
    parser.add_argument(
        "--size", type=parse_size, default="64KiB", help="bytes per package (default 64KiB)"
    )
    parser.add_argument(
        "--requests", type=int, default=20_000, help="requests per replay (default 20000)"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive client connections (default 32)"
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions, each from empty caches (default 3)"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy every cachesvc process during its replay, into DIR"
    )
    args = parser.parse_args()
    lines = asyncio.run(amain(args))
    publish_report("zipf", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

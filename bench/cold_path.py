"""The cold path against a direct origin GET: L2 hits and misses at 1 and 64 MiB.

Command (from the repository root; installs curl with apt-get when missing)::

    .venv/bin/python bench/cold_path.py [--reps 7] [--sizes 1,64]

Real processes on 127.0.0.1: the moto S3 server (the origin), 3 ``cachesvc
peer`` and 2 ``cachesvc agent`` (A and B). For every repetition and size, a
fresh package of random bytes is put in the origin, then, one after the other
with curl (the same client for every row):

1. **direct**: a presigned GET of the object from the origin server itself:
   the baseline, the cost of the bytes without our hops;
2. **cold**: A's ``/pkg`` (A misses, the owner peer misses, the origin);
3. **L2 hit**: B's ``/pkg`` (B misses, the owner peer has it);
4. **L1 hit**: A's ``/pkg`` again.

Prints medians of ``time_total`` (and TTFB) per row, and the ratios to the
direct GET of the same run with the issue's goals: L2 hit of 64 MiB <= 1.3x,
cold 64 MiB <= 1.5x, cold 1 MiB <= 2x + 2 ms. Writes ``bench/out/cold_path.md``.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import Procs, free_port, publish_report, wait_http  # noqa: E402
from loadtest.tools import require  # noqa: E402

MiB = 1 << 20
VENV_BIN = Path(sys.executable).parent
BUCKET = "bench-cold-path"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CURL_TIMES = "%{time_starttransfer} %{time_total} %{http_code} %{size_download}"
ROWS = ("direct", "cold", "L2 hit", "L1 hit")
GOALS = {("L2 hit", 64): (1.3, 0.0), ("cold", 64): (1.5, 0.0), ("cold", 1): (2.0, 0.002)}


@dataclass
class Timings:
    ttfb: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROWS})
    total: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROWS})


@dataclass
class Stack:
    endpoint: str
    agents: list[str]
    procs: Procs


def curl(url: str, size: int) -> tuple[float, float]:
    """(TTFB, total) of one GET; the whole body must arrive."""
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", CURL_TIMES, url],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout.split()  # fmt: skip
    if out[2] != "200" or int(out[3]) != size:
        raise RuntimeError(f"GET {url}: {out}")
    return float(out[0]), float(out[1])


def start_stack(work: Path, procs: Procs, extra: list[str]) -> Stack:
    port = free_port()
    procs.start("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/", ok=())
    _s3(endpoint).create_bucket(Bucket=BUCKET)
    origin = ["--origin", f"s3://{BUCKET}", "--s3-endpoint", endpoint, "--log-level", "WARNING"]
    peer_ports = [free_port() for _ in range(3)]
    peers = ",".join(f"http://127.0.0.1:{p}" for p in peer_ports)
    for i, p in enumerate(peer_ports):
        me = ["--advertise", f"http://127.0.0.1:{p}"]
        argv = _argv("peer", p, work / f"peer{i}", *origin, "--peers", peers, *me, *extra)
        procs.start(f"peer{i}", argv, AWS_ENV)
    agents = []
    for i in range(2):
        p = free_port()
        argv = _argv("agent", p, work / f"agent{i}", *origin, "--peers", peers, *extra)
        procs.start(f"agent{i}", argv, AWS_ENV)
        agents.append(f"http://127.0.0.1:{p}")
    for url in [f"http://127.0.0.1:{p}" for p in peer_ports] + agents:
        wait_http(f"{url}/readyz")
    return Stack(endpoint, agents, procs)


def _argv(kind: str, port: int, cache: Path, *extra: str) -> list[str]:
    listen = ["--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache), "--cache-size", "8GiB"]
    return [str(VENV_BIN / "cachesvc"), kind, *listen, *extra]


def _s3(endpoint: str) -> Any:  # a boto3 client: untyped
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
    )


def put_fresh(stack: Stack, size: int) -> tuple[str, str]:
    """A new random package in the origin: (hex digest, presigned URL)."""
    import hashlib

    data = os.urandom(size)
    hex_ = hashlib.sha256(data).hexdigest()
    s3 = _s3(stack.endpoint)
    key = f"blobs/sha256/{hex_}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    return hex_, url


def one_round(stack: Stack, size: int, into: Timings) -> None:
    hex_, direct = put_fresh(stack, size)
    a, b = (f"{agent}/pkg/sha256:{hex_}" for agent in stack.agents)
    for row, url in zip(ROWS, (direct, a, b, a), strict=True):
        ttfb, total = curl(url, size)
        into.ttfb[row].append(ttfb)
        into.total[row].append(total)


def report(results: dict[int, Timings], reps: int) -> list[str]:
    lines = [
        f"Medians of {reps} rounds (curl time_total; TTFB in brackets), ratio to the direct GET",
        "of the same rounds. Goals: L2 hit 64 MiB <= 1.3x, cold 64 MiB <= 1.5x, "
        "cold 1 MiB <= 2x + 2 ms.",
        "",
        "| size | row | total ms | TTFB ms | x direct | goal |",
        "|---|---|---|---|---|---|",
    ]
    for size_mib, t in results.items():
        direct = statistics.median(t.total["direct"])
        for row in ROWS:
            total = statistics.median(t.total[row])
            ttfb = statistics.median(t.ttfb[row])
            goal = GOALS.get((row, size_mib))
            verdict = ""
            if goal is not None:
                limit = goal[0] * direct + goal[1]
                extra = f" + {goal[1] * 1000:.0f} ms" if goal[1] else ""
                verdict = f"<= {goal[0]}x{extra}: {'met' if total <= limit else 'MISSED'}"
            lines.append(f"| {size_mib} MiB | {row} | {total * 1000:.1f} | {ttfb * 1000:.1f} "
                         f"| {total / direct:.2f} | {verdict} |")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--reps", type=int, default=7, help="rounds; figures are their medians (default 7)"
    )
    parser.add_argument(
        "--sizes", default="1,64", help="package sizes in MiB, comma-separated (default 1,64)"
    )
    parser.add_argument("--extra", default="", help="extra flags for every cachesvc process")
    args = parser.parse_args()
    require({"curl": "curl"})
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="cachesvc-cold-") as tmp:
        procs = Procs(Path(tmp) / "logs")
        try:
            stack = start_stack(Path(tmp), procs, args.extra.split())
            one_round(stack, MiB // 4, Timings())  # first-call costs out of the figures
            results = {s: Timings() for s in sizes}
            for _ in range(args.reps):
                for s in sizes:
                    one_round(stack, s * MiB, results[s])
        finally:
            procs.stop_all()
    lines = report(results, args.reps)
    publish_report("cold_path", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

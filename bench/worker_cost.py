"""What one unpack worker costs: a one-file tar extracted N times through ``Workers``
(a confined process forked per package) against ``extract`` in this process.

Command (from the repository root)::

    .venv/bin/python bench/worker_cost.py [--runs 300] [--scratch /dev/shm]

Prints the fork server's start-up, then medians, p99 and minimum in ms of both
ways and their difference: the per-package price of isolation, without the
corpus that ``bench/packages.py`` (table d) needs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachesvc.unpack.codec import Limits  # noqa: E402
from cachesvc.unpack.extract import extract  # noqa: E402
from cachesvc.unpack.worker import Workers  # noqa: E402


def one_file_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    return buf.getvalue()


def row(name: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{name:10} {statistics.median(ms):8.1f} {p99:8.1f} {ms[0]:8.1f}"


async def run(root: Path, runs: int) -> None:
    package = root / "pkg.tar"
    package.write_bytes(one_file_tar())
    workers = Workers(2)
    started = time.perf_counter()
    await workers.start()
    print(f"fork server start: {(time.perf_counter() - started) * 1000:.0f} ms")
    worker: list[float] = []
    inline: list[float] = []
    try:
        for i in range(runs):  # alternating, so both see the same machine
            for times, way in ((worker, "w"), (inline, "i")):
                dest = root / f"{way}{i}"
                dest.mkdir()
                started = time.perf_counter()
                if way == "w":
                    await workers.extract(package, dest, Limits())
                else:
                    extract(package, dest, Limits())
                times.append(time.perf_counter() - started)
    finally:
        await workers.aclose()
    print(f"{'':10} {'median':>8} {'p99':>8} {'min':>8}  (ms, {runs} runs)")
    print(row("Workers", worker))
    print(row("extract", inline))
    print(f"overhead: {(statistics.median(worker) - statistics.median(inline)) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.scratch) as root:
        asyncio.run(run(Path(root), args.runs))


if __name__ == "__main__":
    main()

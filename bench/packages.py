"""Package handling against the standard tools, on the real corpus of ``bench/corpus.py``.

Command (from the repository root; builds the corpus first if needed)::

    .venv/bin/python bench/packages.py [--runs 5] [--level 19] [--scratch DIR]

Prints four tables:

a. each corpus package's size as the deployment zip, as zstd over the zip,
   and repacked as tar.zst (``cachesvc.publish.repack``, zstd level 19 + long mode);
b. unpack time of the largest package through ``Unpacker`` against
   ``unzip -q`` (the zip) and ``tar --zstd -xf`` (the tar.zst) on the same
   bytes, medians of ``--runs`` alternating runs; target ratio <= 1.2;
c. zstd decode throughput of ``cachesvc.unpack.codec`` (the package's stream read
   to the end) against ``zstd -d -c FILE > /dev/null`` (its time includes
   process start, a few ms), for every tar.zst and the largest zstd,zip;
   target ratio >= 0.8;
d. what isolation costs: every corpus package (zip and tar.zst) through
   ``Unpacker`` (one forked, confined worker process per package) against
   ``cachesvc.unpack.extract.extract`` run in the benchmark's own process.

Each timed run extracts into a fresh directory under ``--scratch`` (default
``/dev/shm``, a tmpfs, so the figures compare CPU work rather than this
machine's noisy disk; pass ``--scratch bench/out/scratch`` for the disk);
``os.sync()`` runs before each so earlier write-back does not land in the
next measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import corpus  # noqa: E402
from cachesvc.digest import Digest  # noqa: E402
from cachesvc.publish import repack  # noqa: E402
from cachesvc.unpack import codec  # noqa: E402
from cachesvc.unpack.extract import extract  # noqa: E402
from cachesvc.unpack.unpacker import Unpacker  # noqa: E402

MiB = 2**20


def sizes(packages: list[Path], work: Path, level: int) -> dict[Path, Path]:
    """Table (a); returns each zip's tar.zst (repacked even when not smaller)."""
    print(f"\n(a) sizes, MiB (zstd level {level}, long mode)")
    print(f"{'package':24} {'zip':>8} {'zstd,zip':>9} {'zstd,tar':>9}  best")
    repacked = {}
    for zip_path in packages:
        dst = work / (zip_path.stem + ".tar.zst")
        report = repack.repack(zip_path, dst, level=level)
        if not report.kept:  # keep one anyway for the timing tables
            repack.repack(zip_path, dst, level=1)
        repacked[zip_path] = dst
        print(
            f"{zip_path.stem:24} {report.zip_size / MiB:8.2f} {report.zstd_zip_size / MiB:9.2f}"
            f" {report.tar_zstd_size / MiB:9.2f}  {report.best}"
        )
    return repacked


def timed(run: Callable[[], object], fresh: Path) -> float:
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    os.sync()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def unpack_once(digest: Digest, package: Path, code_dir: Path) -> None:
    async def run() -> None:
        async with Unpacker(code_dir) as unpacker:
            await unpacker.unpack(digest, package)

    asyncio.run(run())


def compare_isolation(packages: list[Path], work: Path, runs: int) -> None:
    """The worker process's cost: ``Unpacker`` (a forked, confined worker per
    package) against :func:`cachesvc.unpack.extract.extract` called in this process."""
    limits = codec.Limits()
    for package in packages:
        digest = Digest.parse(hashlib.sha256(package.read_bytes()).hexdigest())
        worker, inline = [], []
        for _ in range(runs):
            worker.append(timed(partial(unpack_once, digest, package, work / "w"), work / "w"))
            inline.append(timed(partial(extract, package, work / "i", limits), work / "i"))
        a, b = statistics.median(worker), statistics.median(inline)
        print(f"{package.name:32} {a * 1000:9.1f} {b * 1000:9.1f} {(a - b) * 1000:9.1f}")


def compare_unpack(package: Path, tool: list[str], work: Path, runs: int) -> None:
    digest = Digest.parse(hashlib.sha256(package.read_bytes()).hexdigest())
    cmd = [*tool, str(package)]
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(timed(lambda: unpack_once(digest, package, work / "ours"), work / "ours"))
        theirs.append(
            timed(lambda: subprocess.run(cmd, cwd=work / "theirs", check=True), work / "theirs")
        )
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{package.name:32} {a * 1000:9.0f} {b * 1000:9.0f}  {a / b:5.2f}x  ({' '.join(tool)})")


def decode_codec(path: Path) -> int:
    total = 0
    with codec.open_stream(path) as archive:
        while chunk := archive.stream.read(MiB):
            total += len(chunk)
    return total


def compare_decode(path: Path, runs: int) -> None:
    size = decode_codec(path)
    ours, theirs = [], []
    for _ in range(runs):
        start = time.perf_counter()
        decode_codec(path)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run(["zstd", "-q", "-d", "-c", str(path)], stdout=subprocess.DEVNULL, check=True)
        theirs.append(time.perf_counter() - start)
    a, b = size / statistics.median(ours) / MiB, size / statistics.median(theirs) / MiB
    print(f"{path.name:32} {size / MiB:7.1f} {a:9.0f} {b:9.0f}  {a / b:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--level", type=int, default=19)
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm/cachesvc-bench"))
    args = parser.parse_args()
    packages = corpus.build(corpus.DEFAULT_OUT)
    work = corpus.DEFAULT_OUT / "packages"
    work.mkdir(parents=True, exist_ok=True)
    repacked = sizes(packages, work, args.level)
    largest = max(packages, key=lambda p: p.stat().st_size)

    print(f"\n(b) unpack into {args.scratch}, median of {args.runs} runs, ms (target <= 1.2x)")
    print(f"{'package':32} {'Unpacker':>9} {'tool':>9}  ratio")
    for package in (largest, repacked[largest]):
        tool = ["unzip", "-q"] if package.suffix == ".zip" else ["tar", "--zstd", "-xf"]
        compare_unpack(package, tool, args.scratch, args.runs)
    shutil.rmtree(args.scratch, ignore_errors=True)

    print(f"\n(c) zstd decode, median of {args.runs} runs, MiB/s (target >= 0.8x)")
    print(f"{'file':32} {'MiB out':>7} {'codec':>9} {'zstd -d':>9}  ratio")
    for tar_zst in repacked.values():
        compare_decode(tar_zst, args.runs)
    zstd_zip = work / (largest.name + ".zst")
    repack.compress(largest, zstd_zip, "zstd", level=args.level)
    compare_decode(zstd_zip, args.runs)

    print(f"\n(d) unpack in a worker process vs in-process, median of {args.runs} runs, ms")
    print(f"{'package':32} {'Unpacker':>9} {'extract':>9} {'overhead':>9}")
    compare_isolation([*packages, *repacked.values()], args.scratch, args.runs)
    shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

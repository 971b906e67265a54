"""Time to runnable code: a cold ``POST /pkg/{d}/unpack`` against download and unpack alone.

Command (from the repository root; builds the corpus of ``bench/corpus.py``
first if needed)::

    .venv/bin/python bench/runnable.py [--reps 3] [--rate 100MiB]

Real processes on 127.0.0.1: the moto S3 server behind the counting proxy of
``loadtest/origin_proxy.py``, paced to ``--rate`` bytes/s (the origin's
bandwidth, 100 MiB/s by default), and two independent pairs of ``cachesvc
peer`` + ``cachesvc agent``. For each corpus package, as built (the
deployment zip) and repacked (tar + one zstd layer, ``publish --repack``),
and each repetition, with a fresh variant of the package (one more small
member: a new digest, so every fetch is cold):

* **D**, download: pair A's agent GETs it (agent miss, peer miss, origin);
* **U**, unpack alone: pair A's agent unpacks it, now local;
* **T**, time to the unpacked tree: pair B's agent unpacks another fresh
  variant, cold: download, decoding and extraction overlap, and the tree is
  renamed into place after the sha256 verdict.

Prints medians per package and format: D, U, D + U (what a cold unpack cost
before it overlapped), T, and T / max(D, U) with the goal <= 1.1. Writes
``bench/out/runnable.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import corpus  # noqa: E402
from bench.procs import publish_report  # noqa: E402
from cachesvc.config import parse_size  # noqa: E402
from cachesvc.publish import repack  # noqa: E402
from cachesvc.publish.upload import publish_blob  # noqa: E402
from cachesvc.upstream.origin import Origin, make_origin  # noqa: E402
from loadtest.origin_proxy import S3Proxy  # noqa: E402
from loadtest.procs import Child, free_port, spawn, venv_tool, wait_ready  # noqa: E402
from loadtest.stack import AWS_ENV, BUCKET, start_moto  # noqa: E402

MiB = 1 << 20


@dataclass
class Pair:
    peer: str
    agent: str


@dataclass
class Figures:
    d: list[float] = field(default_factory=list)
    u: list[float] = field(default_factory=list)
    t: list[float] = field(default_factory=list)


def variant(package: Path, tag: str, out: Path) -> Path:
    """``package`` plus one small member named by ``tag``: same shape, new digest."""
    dst = out / f"{package.stem}-{tag}{''.join(package.suffixes)}"
    data = package.read_bytes()
    if package.suffix == ".zip":
        buf = io.BytesIO(data)
        with zipfile.ZipFile(buf, "a") as zf:
            zf.writestr(f"variant-{tag}.txt", tag)
        dst.write_bytes(buf.getvalue())
    else:  # tar.zst: decompress, append, recompress at a fast level
        import zstandard

        raw = io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(data))
        with tarfile.open(fileobj=raw, mode="a") as tf:
            info = tarfile.TarInfo(f"variant-{tag}.txt")
            info.size = len(tag)
            tf.addfile(info, io.BytesIO(tag.encode()))
        dst.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw.getvalue()))
    return dst


async def start_pair(proxy: S3Proxy, work: Path, name: str, logs: Path) -> tuple[Pair, list[Child]]:
    peer_url = f"http://127.0.0.1:{free_port()}"
    agent_url = f"http://127.0.0.1:{free_port()}"
    common = ["--origin", f"s3://{BUCKET}", "--s3-endpoint", proxy.url, "--log-level", "WARNING"]
    children = []
    for role, url in (("peer", peer_url), ("agent", agent_url)):
        argv = [venv_tool("cachesvc"), role, "--listen", url.removeprefix("http://")]
        argv += ["--cache-dir", str(work / f"{name}-{role}"), "--cache-size", "8GiB", *common]
        argv += ["--peers", peer_url]
        if role == "agent":
            argv += ["--code-dir", str(work / f"{name}-code")]
        child = await spawn(f"{name}-{role}", argv, logs / f"{name}-{role}.log", env=AWS_ENV)
        await wait_ready(child, url + "/readyz")
        children.append(child)
    return Pair(peer_url, agent_url), children


async def timed(method: str, url: str) -> float:
    start = time.perf_counter()
    async with aiohttp.ClientSession() as s, s.request(method, url) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{method} {url}: {r.status} {body[:300]!r}")
    return time.perf_counter() - start


async def one_rep(
    package: Path, rep: int, pairs: tuple[Pair, Pair], origin: Origin, work: Path
) -> tuple[float, float, float]:
    a, b = pairs
    first = variant(package, f"{rep}a", work)
    second = variant(package, f"{rep}b", work)
    d1, _, _ = await publish_blob(origin, first)
    d2, _, _ = await publish_blob(origin, second)
    download = await timed("GET", f"{a.agent}/pkg/{d1}")
    unpack = await timed("POST", f"{a.agent}/pkg/{d1}/unpack")
    runnable = await timed("POST", f"{b.agent}/pkg/{d2}/unpack")
    for path in (first, second):
        path.unlink()
    return download, unpack, runnable


def report(results: dict[str, Figures], rate: int, reps: int) -> list[str]:
    lines = [
        f"Origin paced to {rate / MiB:.0f} MiB/s; medians of {reps} cold repetitions; seconds.",
        "D = download (GET through agent and peer), U = unpack of the local package,",
        "T = cold unpack (download, decoding and extraction overlapping).",
        "Goal: T <= 1.1 x max(D, U).",
        "",
        "| package | D | U | D + U | T | T / max(D, U) | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in results.items():
        d, u, t = (statistics.median(x) for x in (f.d, f.u, f.t))
        ratio = t / max(d, u)
        verdict = "met" if ratio <= 1.1 else "MISSED"
        lines.append(f"| {name} | {d:.3f} | {u:.3f} | {d + u:.3f} | {t:.3f} | {ratio:.2f} | "
                     f"{verdict} |")  # fmt: skip
    return lines


async def amain(args: argparse.Namespace) -> list[str]:
    for name, value in AWS_ENV.items():  # this process seeds moto too
        os.environ.setdefault(name, value)
    packages = corpus.build(corpus.DEFAULT_OUT)
    with tempfile.TemporaryDirectory(prefix="cachesvc-runnable-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        forms: list[Path] = []
        for zip_path in packages:
            tar_zst = work / f"{zip_path.stem}.tar.zst"
            made = await asyncio.to_thread(repack.repack, zip_path, tar_zst)  # as publish does
            if not made.kept:  # one anyway, for the figures
                await asyncio.to_thread(repack.repack, zip_path, tar_zst, 1)
            forms += [zip_path, tar_zst]
        moto, moto_url = await start_moto(logs)
        proxy = await S3Proxy(moto_url, rate=args.rate).start()
        origin = make_origin(f"s3://{BUCKET}", moto_url)
        children: list[Child] = []
        try:
            a, ca = await start_pair(proxy, work, "a", logs)
            b, cb = await start_pair(proxy, work, "b", logs)
            children = ca + cb
            results: dict[str, Figures] = {}
            for form in forms:
                figures = results.setdefault(form.name, Figures())
                for rep in range(args.reps):
                    d, u, t = await one_rep(form, rep, (a, b), origin, work)
                    figures.d.append(d)
                    figures.u.append(u)
                    figures.t.append(t)
                    print(f"  {form.name} rep {rep}: D {d:.3f} U {u:.3f} T {t:.3f}", flush=True)
        finally:
            for child in children:
                await child.stop()
            await origin.close()
            await proxy.stop()
            await moto.stop()
    return report(results, args.rate, args.reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--reps", type=int, default=3, help="rounds per package; medians (default 3)"
    )
    parser.add_argument(
        "--rate", type=parse_size, default="100MiB", help="origin bytes/s (default 100MiB)"
    )
    args = parser.parse_args()
    lines = asyncio.run(amain(args))
    publish_report("runnable", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m loadtest fanout``: the fan-out emulation of a cold storm on one machine.

    .venv/bin/python -m loadtest fanout        # N = 4,8,16,24; K = 0,2; 16 MiB; 40MiB/s
    .venv/bin/python -m loadtest fanout --n 8,16 --k 2 --size 32MiB --egress-limit 20MiB

Per K, one stack on loopback: moto behind the counting :class:`S3Proxy`, 3
``cachesvc peer`` and max(N) ``cachesvc agent`` processes, all with
``--egress-limit``, agents with ``--advertise`` and ``--fanout K``, peers with
``--fanout K``. Per N, two fresh packages of random bytes: the *solo* one is
fetched by agent 0 alone; then the *storm* one by agents 0..N-1 at once (every
connection opened first, every request then written in one pass; each body's
sha256 checked by the client).

Before the first storm every host is warmed up: for each peer, a tiny package
it owns is fetched by every agent at once. Production hosts are long-running;
a fresh process's first request pays for connection pools and the S3 client,
which would otherwise land in whichever measurement comes first.

"Holds it" is when the agent's store had the whole package: the mtime of its
blob file (the last byte written; the sha256 verdict follows at once, and a
failed verdict leaves no file). It costs no polling, so it perturbs nothing.
Where no blob file is found, the client's last byte stands in (``holds_from``).

Flags this build's ``cachesvc`` does not know yet (``--egress-limit``,
``--fanout``, agents' ``--advertise``) are left out and named in the report;
K > 0 without ``--fanout`` is skipped, and without ``--egress-limit`` there is
no simulator prediction (unlimited loopback is not what it models).

Writes ``results.json`` and ``report.md`` into ``--out`` (default
``loadtest/out/fanout-<time>``). Exit status 1 when a body was bad, an agent
never held the package, or a storm cost other than one origin GET.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
from prometheus_client.parser import text_string_to_metric_families

from cachesvc.config import parse_size
from cachesvc.digest import Digest
from cachesvc.serve.egress import parse_rate
from cachesvc.upstream.origin import make_origin
from cachesvc.upstream.ring import Ring
from loadtest.fanout_report import Row, predict, write_outputs
from loadtest.hashstorm import Fetch, storm
from loadtest.origin_proxy import S3Proxy
from loadtest.procs import venv_tool
from loadtest.seed import publish_random
from loadtest.stack import BUCKET, Extra, local_stack

PEERS = 3
DEFAULT_K = 2
NEW_FLAGS = ("--egress-limit", "--fanout", "--advertise")
OUT = Path(__file__).with_name("out")
UPLOAD_METRIC = "cachesvc_upload_bytes_total"
SERVED_METRIC = "cachesvc_bytes_served_total"
WARMUP_SIZE = 64 * 1024
WARMUP_TRIES = 40  # P(some of 3 peers owns none of 40 random digests) ≈ 3·(2/3)^40 ≈ 1e-7


@dataclass(frozen=True)
class Plan:
    ns: list[int]
    ks: list[int]
    size: int
    egress_text: str  # as given to the services
    out: Path

    @property
    def egress(self) -> float | None:
        return parse_rate(self.egress_text)

    def storm_timeout(self, n: int) -> float:
        """Owner-only at the limit takes N × size / E; allow twice that, plus a minute."""
        rate = self.egress or 50 * (1 << 20)
        return 60 + 2 * n * self.size / rate


@dataclass
class Stack:
    proxy: S3Proxy
    moto_url: str
    peers: list[str]
    agents: list[str]
    caches: Path  # each process's store is <caches>/<role>-<index>; also the seeding dir


def add_parser(sub: Any) -> None:
    """The ``fanout`` subcommand of ``python -m loadtest``."""
    cmd = sub.add_parser("fanout", help="the fan-out emulation (a storm on N agents)")
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    cmd.add_argument(
        "--n",
        type=ints,
        default=[4, 8, 16, 24],
        help="agents per storm, comma-separated (default 4,8,16,24)",
    )
    cmd.add_argument(
        "--k",
        type=ints,
        default=[0, DEFAULT_K],
        help=f"--fanout of every host, comma-separated (default 0,{DEFAULT_K})",
    )
    cmd.add_argument(
        "--size", type=parse_size, default=16 << 20, help="package size (default 16MiB)"
    )
    cmd.add_argument(
        "--egress-limit", default="40MiB", help="of every host, bytes/s (default 40MiB)"
    )
    cmd.add_argument("--out", type=Path, help="default loadtest/out/fanout-<time>")


def main(args: argparse.Namespace) -> int:
    parse_rate(args.egress_limit)  # refuse a bad rate before starting anything
    out = args.out or OUT / time.strftime("fanout-%Y%m%d-%H%M%S")
    plan = Plan(sorted(set(args.n)), sorted(set(args.k)), args.size, args.egress_limit, out)
    rows, notes = asyncio.run(run(plan))
    report = write_outputs(plan.out, plan, rows, notes, DEFAULT_K)
    print(report.read_text())
    print(f"report: {report}")
    broken = [r for r in rows if r.bad_bodies or r.origin_gets != 1 or r.missing_holds]
    return 1 if broken or not rows else 0


def known_flags(role: str) -> frozenset[str]:
    """Which of the fan-out flags ``cachesvc ROLE --help`` lists."""
    argv = [venv_tool("cachesvc"), role, "--help"]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    return frozenset(f for f in NEW_FLAGS if re.search(rf"(?<![\w-]){f}(?![\w-])", text))


async def run(plan: Plan) -> tuple[list[Row], list[str]]:
    plan.out.mkdir(parents=True, exist_ok=True)
    flags = {role: known_flags(role) for role in ("agent", "peer")}
    notes = [
        f"`cachesvc {role}` has no {flag}: left out"
        for role, known in flags.items()
        for flag in NEW_FLAGS
        if flag not in known and not (role == "peer" and flag == "--advertise")
    ]
    rows: list[Row] = []
    for k in plan.ks:
        if k > 0 and "--fanout" not in flags["agent"]:
            notes.append(f"K={k} skipped: agents have no --fanout")
            continue
        async with fanout_stack(plan, k, flags, plan.out / f"logs-k{k}") as stack:
            for n in plan.ns:
                print(f"loadtest fanout: K={k} N={n}", file=sys.stderr, flush=True)
                rows.append(await measure(stack, plan, n, k, "--egress-limit" in flags["peer"]))
    return rows, notes


def tier_flags(k: int, plan: Plan, flags: dict[str, frozenset[str]]) -> Extra:
    """The fan-out flags of one process, as far as this build knows them."""

    def extra(role: str, url: str) -> list[str]:
        known = flags[role]
        argv = ["--egress-limit", plan.egress_text] if "--egress-limit" in known else []
        argv += ["--fanout", str(k)] if "--fanout" in known else []
        return argv + (["--advertise", url] if role == "agent" and "--advertise" in known else [])

    return extra


@asynccontextmanager
async def fanout_stack(
    plan: Plan, k: int, flags: dict[str, frozenset[str]], logs: Path
) -> AsyncIterator[Stack]:
    """moto, the proxy, 3 peers and max(N) agents; everything stopped at the end."""
    logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CACHESVC_PEER_TOKEN", secrets.token_hex(16))  # agent→agent too
    extra = tier_flags(k, plan, flags)
    async with local_stack(logs, PEERS, max(plan.ns), nginx=False, extra=extra) as ls:
        assert ls.caches is not None
        ready = Stack(ls.proxy, ls.moto_url, ls.peers, ls.agents, ls.caches)
        await warm_up(ready)
        yield ready


async def warm_up(stack: Stack) -> None:
    """Every agent fetches, at once, one tiny package owned by each peer."""
    ring = Ring()
    ring.set_nodes(stack.peers)
    owners: set[str | None] = set()
    for i in range(WARMUP_TRIES):  # a new package's owner is random: bounded tries
        (pkg,) = await publish(stack, WARMUP_SIZE, f"warm{i}", ("warm",))
        owner = ring.owner(_digest(pkg))
        if owner not in owners:
            owners.add(owner)
            every = [fetch(stack, a, pkg) for a in range(len(stack.agents))]
            result = await storm(every, timeout=60)
            if result.bad:
                raise RuntimeError(f"warm-up storm: {result.fetches[0].error or 'bad bodies'}")
        if len(owners) == len(stack.peers):
            return


async def measure(stack: Stack, plan: Plan, n: int, k: int, limited: bool) -> Row:
    """One solo fetch, then one storm on agents 0..n-1, each of a fresh package."""
    solo_pkg, storm_pkg, cal_pkg = await publish(stack, plan.size, f"n{n}")
    origin_ttfb, origin_bw = await origin_speed(stack, cal_pkg)
    timeout = plan.storm_timeout(n)
    solo = await storm([fetch(stack, 0, solo_pkg)], timeout)
    solo_s = holds(stack, [0], solo_pkg, solo.started_wall, solo.fetches)[0][0]
    before, _ = await uploads(stack)
    result = await storm([fetch(stack, i, storm_pkg) for i in range(n)], timeout)
    after, upload_from = await uploads(stack)
    held = holds(stack, list(range(n)), storm_pkg, result.started_wall, result.fetches)
    up = {url: after[url] - before.get(url, 0) for url in after}
    top = max(up, key=lambda url: up[url]) if up else ""
    hop = max(0.0, solo.fetches[0].ttfb - origin_ttfb)
    row = Row(
        n=n,
        k=k,
        size=plan.size,
        egress=plan.egress if limited else None,
        solo_s=solo_s,
        holds_s=[t for t, _ in held],
        holds_from=sorted({src for _, src in held}),
        client_s=[f.total for f in result.fetches],
        origin_gets=stack.proxy.blob_gets(_digest(storm_pkg)),
        largest_upload=up.get(top, 0),
        uploader=_role(stack, top),
        upload_from=upload_from,
        bad_bodies=result.bad,
        errors=[f.error for f in result.fetches if f.error][:3],
        calibration={"hop_latency_s": hop, "origin_ttfb_s": origin_ttfb, "origin_Bps": origin_bw},
        agent_upload=sum(v for url, v in up.items() if url in stack.agents),
    )
    row.sim = predict(row) if limited else None
    return row


async def publish(
    stack: Stack, size: int, tag: str, roles: tuple[str, ...] = ("solo", "storm", "cal")
) -> list[dict[str, Any]]:
    """Fresh packages (by default solo, storm, calibration), straight to moto (not counted)."""
    origin = make_origin(f"s3://{BUCKET}", stack.moto_url)
    s3 = boto3.client("s3", endpoint_url=stack.moto_url)
    try:
        return [
            await publish_random(origin, s3, BUCKET, f"fanout-{role}-{tag}", 0, size, stack.caches)
            for role in roles
        ]
    finally:
        await origin.close()


async def origin_speed(stack: Stack, pkg: dict[str, Any]) -> tuple[float, float]:
    """Time to first byte and bytes/s of one GET through the proxy (its own package)."""
    url = f"{stack.proxy.url}/{BUCKET}/blobs/sha256/{pkg['hex']}"
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        async with session.get(url) as resp:
            ttfb = time.perf_counter() - t0
            async for _ in resp.content.iter_chunked(1 << 20):
                pass
            total = time.perf_counter() - t0
    return ttfb, pkg["size"] / max(total - ttfb, 1e-6)


def fetch(stack: Stack, agent: int, pkg: dict[str, Any]) -> Fetch:
    port = int(stack.agents[agent].rsplit(":", 1)[1])
    return Fetch(port, f"/pkg/sha256:{pkg['hex']}", pkg["hex"])


def holds(
    stack: Stack, agents: list[int], pkg: dict[str, Any], wall0: float, fetches: list[Fetch]
) -> list[tuple[float, str]]:
    """Per agent, seconds from the storm's start until its store held the package."""
    out = []
    for i, f in zip(agents, fetches, strict=True):
        blob = stack.caches / f"agent-{i}" / "blobs" / "sha256" / pkg["hex"]
        try:
            out.append((blob.stat().st_mtime - wall0, "store"))
        except OSError:
            out.append((f.total, "client"))
    return out


async def uploads(stack: Stack) -> tuple[dict[str, int], str]:
    """Bytes each host sent to other hosts, and where the figure came from:
    ``cachesvc_upload_bytes_total`` where every host has it; else, on a build
    without it, each peer's ``cachesvc_bytes_served_total`` (a peer serves only
    other hosts) and nothing for agents (unknown, not 0)."""
    samples = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for url in stack.peers + stack.agents:
            async with session.get(url + "/metrics") as resp:
                samples[url] = _samples(await resp.text())
    if all(UPLOAD_METRIC in s for s in samples.values()):
        return {url: int(s[UPLOAD_METRIC]) for url, s in samples.items()}, UPLOAD_METRIC
    served = {url: int(samples[url].get(SERVED_METRIC, 0)) for url in stack.peers}
    return served, f"{SERVED_METRIC} of peers (agents unknown: no {UPLOAD_METRIC})"


def _samples(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _digest(pkg: dict[str, Any]) -> Digest:
    return Digest.parse(pkg["hex"])


def _role(stack: Stack, url: str) -> str:
    if url in stack.peers:
        return f"peer-{stack.peers.index(url)}"
    return f"agent-{stack.agents.index(url)}" if url in stack.agents else ""

"""``cachesvc up``: the whole stack on one machine, on embedded defaults.

A ``file://`` origin, three L2 peers and one agent on loopback, in one
process; a sample package (a zip of a tiny function, with a zstd layer on top)
is published under tenant ``demo``. Prints working ``curl`` lines; Ctrl-C stops
everything cleanly.

The services get ``CACHESVC_TOKEN`` and ``CACHESVC_PEER_TOKEN`` from the
environment ``up`` runs in, as ``cachesvc agent`` and ``peer`` would, so
``cachesvc warm`` can be tried against them. The banner's claim about the
first GET is asked of the running agent (a HEAD, which answers with the tier a
GET would come from without downloading the body), never assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import zipfile
from pathlib import Path

import aiohttp

from cachesvc.cli import Commands
from cachesvc.config import (
    Settings,
    add_flag,
    check_dir,
    operator_token,
    parse_port,
    parse_size,
    peer_token,
)
from cachesvc.digest import Digest
from cachesvc.publish.repack import compress
from cachesvc.publish.upload import Published, publish
from cachesvc.serve.registry import AGENT, PEER, load_service
from cachesvc.serve.runner import serve
from cachesvc.tier import Tier
from cachesvc.upstream.origin import FileOrigin

GRACE = 5.0  # seconds to drain on Ctrl-C: a demo, not a host's traffic


def add_to(commands: Commands) -> None:
    up = commands.add_parser(
        "up",
        help="run a whole stack on this machine (origin, 3 peers, 1 agent)",
        description="A file:// origin, three L2 peers and one agent on loopback, with a "
        "sample package published; prints curl lines. Ctrl-C stops it.",
    )
    add_flag(up, "--dir", "where origin and caches live (default: a temp dir)", type=Path)
    add_flag(up, "--agent-port", "the agent's port", type=parse_port, default="8700")
    add_flag(up, "--peer-port", "first of three peer ports", type=parse_port, default="8701")
    up.set_defaults(run=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    if args.dir is not None:
        check_dir("--dir", args.dir)
    return run_up(args.dir, args.agent_port, args.peer_port)


HANDLER = b"""def handler(event, context):
    return {"statusCode": 200, "body": "hello from a cachesvc package"}
"""


def sample_zip() -> bytes:
    """A small, real function package; the same bytes on every run (fixed
    timestamps), so ``up --dir`` restarted on its data serves the same digest."""
    files = {
        "handler.py": HANDLER,
        "lib/util.py": b"GREETING = 'hello'\n" * 200,
        "requirements.txt": b"# no dependencies\n",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


async def publish_sample(root: Path) -> Published:
    work = root / "sample"
    work.mkdir(parents=True, exist_ok=True)
    (work / "app.zip").write_bytes(sample_zip())
    await asyncio.to_thread(compress, work / "app.zip", work / "app.zip.zst", "zstd")
    origin = FileOrigin(root / "origin")
    await origin.start()
    return await publish(origin, work / "app.zip.zst", "demo", "hello", "v1")


def stack_settings(root: Path, agent_port: int, peer_port: int) -> list[Settings]:
    peers = [f"http://127.0.0.1:{peer_port + i}" for i in range(3)]
    origin = f"file://{root / 'origin'}"
    size = parse_size("1GiB")
    settings = [
        Settings(
            listen=("127.0.0.1", peer_port + i),
            cache_dir=root / f"peer-{i}",
            cache_size=size,
            origin=origin,
            peers=",".join(peers),
            advertise=peers[i],
            token=operator_token(),
            peer_token=peer_token(),
        )
        for i in range(3)
    ]
    settings.append(
        Settings(
            listen=("127.0.0.1", agent_port),
            cache_dir=root / "agent",
            cache_size=size,
            origin=origin,
            peers=",".join(peers),
            code_dir=root / "code",
            token=operator_token(),
            peer_token=peer_token(),
        )
    )
    return settings


def run_up(directory: Path | None, agent_port: int, peer_port: int) -> int:
    """Publish the sample, then serve the stack until Ctrl-C (or SIGTERM)."""
    make_peer, make_agent = load_service(PEER), load_service(AGENT)
    with tempfile.TemporaryDirectory(prefix="cachesvc-up-") as tmp:
        root = directory or Path(tmp)
        published = asyncio.run(publish_sample(root))
        *peer_settings, agent_settings = stack_settings(root, agent_port, peer_port)
        apps = [(make_peer(s), s.listen) for s in peer_settings]
        apps.append((make_agent(agent_settings), agent_settings.listen))

        async def banner() -> None:
            first = await first_tier(agent_settings.listen_url, published.digest)
            print(_banner(root, agent_settings, peer_settings, published, first), flush=True)

        return serve(apps, GRACE, banner=banner)


TIERS = {
    Tier.L1: "already on this host's disk",
    Tier.L2: "through its owner peer on the ring, which reads the origin",
    Tier.ORIGIN: "straight from the origin",
}


async def first_tier(agent_url: str, digest: Digest) -> str:
    """The ``X-Cache-Tier`` a GET of ``digest`` through the agent gets now, asked
    with a HEAD (the agent answers it from the tier that would serve the GET,
    without downloading the body). Says so when it cannot find out."""
    timeout = aiohttp.ClientTimeout(total=15)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.head(f"{agent_url}/pkg/{digest}") as resp,
        ):
            tier = resp.headers.get("X-Cache-Tier")
            return tier if resp.status == 200 and tier else f"unknown (HEAD: {resp.status})"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"unknown (HEAD failed: {type(exc).__name__})"


def _banner(root: Path, agent: Settings, peers: list[Settings], pub: Published, first: str) -> str:
    a = agent.listen_url
    again = Tier.L1 if first in TIERS else f"{Tier.L1}, once the first one succeeded"
    return f"""
cachesvc is up (data in {root}).
  origin  file://{root / "origin"}
  peers   {", ".join(p.listen_url for p in peers)}
  agent   {a}

A sample package is published: tenant demo, function hello, version v1
  digest  {pub.digest}  ({pub.size} bytes: zstd over zip)

Try:
  curl -sS -o /dev/null -D - {a}/pkg/{pub.digest}      # first: X-Cache-Tier: {first}
  curl -sS -o /dev/null -D - {a}/pkg/{pub.digest}      # again: X-Cache-Tier: {again}
  curl -sS -r 0-99 -o /dev/null -D - {a}/pkg/{pub.digest.hex}   # a range: 206
  curl -sS -X POST {a}/pkg/{pub.digest}/unpack         # unpacked into {agent.code_dir}
  curl -sS {a}/stats
  curl -sS {a}/metrics | grep ^cachesvc_requests
{_first_note(first)}
{_operator_hint(agent, peers)}
Ctrl-C stops it.
"""


def _first_note(first: str) -> str:
    if first not in TIERS:
        return ""
    how = TIERS[Tier(first)]
    return f"The first GET comes {how} (a HEAD through the agent answered {first}).\n"


def _operator_hint(agent: Settings, peers: list[Settings]) -> str:
    """How to try ``cachesvc warm``: it needs the services' CACHESVC_TOKEN."""
    ring = ",".join(p.listen_url for p in peers)
    if agent.token is None:
        return (
            "Operator API (warm) is off: CACHESVC_TOKEN is not set. To try it, start with\n"
            "  CACHESVC_TOKEN=<a secret> cachesvc up\n"
            "and give the same CACHESVC_TOKEN to cachesvc warm.\n"
        )
    return (
        "Operator API: the services use your CACHESVC_TOKEN; with it in the environment:\n"
        f"  cachesvc warm --tenant demo --agent {agent.listen_url}     # into L1\n"
        f"  cachesvc warm --tenant demo --peers {ring}   # into L2\n"
    )

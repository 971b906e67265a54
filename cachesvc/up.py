"""``cachesvc up``: the whole stack on one machine, on embedded defaults.

A ``file://`` origin, three L2 peers and one agent on loopback, in one
process; a sample package (a zip of a tiny function, with a zstd layer on top)
is published under tenant ``demo``. Prints working ``curl`` lines; Ctrl-C stops
everything cleanly.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import zipfile
from pathlib import Path

from cachesvc.cli import serve
from cachesvc.config import Settings, parse_size
from cachesvc.origin import FileOrigin
from cachesvc.publish import Published, publish

HANDLER = b"""def handler(event, context):
    return {"statusCode": 200, "body": "hello from a cachesvc package"}
"""


def sample_zip() -> bytes:
    """A small, real function package."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", HANDLER)
        zf.writestr("lib/util.py", b"GREETING = 'hello'\n" * 200)
        zf.writestr("requirements.txt", b"# no dependencies\n")
    return buf.getvalue()


async def publish_sample(root: Path) -> Published:
    from cachesvc.repack import compress

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
        )
    )
    return settings


def run_up(directory: Path | None, agent_port: int, peer_port: int) -> int:
    import logging

    from cachesvc.peer import make_app as make_peer
    from node_agent.app import make_app as make_agent

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with tempfile.TemporaryDirectory(prefix="cachesvc-up-") as tmp:
        root = directory or Path(tmp)
        published = asyncio.run(publish_sample(root))
        *peer_settings, agent_settings = stack_settings(root, agent_port, peer_port)
        apps = [(make_peer(s), s.listen) for s in peer_settings]
        apps.append((make_agent(agent_settings), agent_settings.listen))

        async def banner() -> None:
            print(_banner(root, agent_settings, peer_settings, published), flush=True)

        return serve(apps, grace=5.0, banner=banner)


def _banner(root: Path, agent: Settings, peers: list[Settings], pub: Published) -> str:
    a = agent.listen_url
    return f"""
cachesvc is up (data in {root}).
  origin  file://{root / "origin"}
  peers   {", ".join(p.listen_url for p in peers)}
  agent   {a}

A sample package is published: tenant demo, function hello, version v1
  digest  {pub.digest}  ({pub.size} bytes: zstd over zip)

Try:
  curl -sS -o /dev/null -D - {a}/pkg/{pub.digest}      # first: X-Cache-Tier: ORIGIN
  curl -sS -o /dev/null -D - {a}/pkg/{pub.digest}      # again: X-Cache-Tier: L1
  curl -sS -r 0-99 -o /dev/null -D - {a}/pkg/{pub.digest.hex}   # a range: 206
  curl -sS -X POST {a}/pkg/{pub.digest}/unpack         # unpacked into {agent.code_dir}
  curl -sS {a}/stats
  curl -sS {a}/metrics | grep ^cachesvc_requests

Ctrl-C stops it.
"""

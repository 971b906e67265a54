"""The ``cachesvc`` command: composes the services; holds no service logic.

Commands: ``agent``, ``peer``, ``up``, ``publish``, ``fetch``, ``warm``. Every
flag can also come from ``CACHESVC_<FLAG>``; secrets come from the environment
only (see :mod:`cachesvc.config`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cachesvc.config import Settings, add_flag, parse_duration, parse_listen, parse_size

DEFAULT_AGENT = "127.0.0.1:8700"
DEFAULT_PEER = "127.0.0.1:8701"
GRACE = 30.0


def _service_flags(p: argparse.ArgumentParser, listen: str, cache: str) -> None:
    add_flag(
        p,
        "--listen",
        "address to listen on, HOST:PORT",
        type=parse_listen,
        default=listen,
    )
    add_flag(p, "--cache-dir", "directory of the package store", type=Path, default=cache)
    add_flag(
        p,
        "--cache-size",
        "store capacity, e.g. 10GiB",
        type=parse_size,
        default="10GiB",
    )
    add_flag(p, "--origin", "s3://BUCKET[/PREFIX] or file:///DIR", required=True)
    add_flag(p, "--s3-endpoint", "custom S3 endpoint (MinIO), addressed path-style")
    add_flag(p, "--origin-timeout", "seconds for each origin call", type=float, default="30")
    add_flag(p, "--max-fetches", "upstream fetches running at once", type=int, default="64")
    add_flag(
        p,
        "--max-queued",
        "fetches waiting for a slot before 503 overloaded",
        type=int,
        default="256",
    )
    add_flag(
        p,
        "--shutdown-grace",
        "seconds to finish in-flight transfers on SIGTERM",
        type=float,
        default=str(GRACE),
    )
    add_flag(
        p,
        "--dns-interval",
        "seconds between lookups of a dns+http:// peers name",
        type=float,
        default="10",
    )
    add_flag(p, "--scrub-interval", "a full re-hash of the store every DURATION (2s, 6h, 1d)",
             type=parse_duration, default="1d")  # fmt: skip
    add_flag(p, "--scrub-rate", "most bytes per second the scrub reads, e.g. 64MiB",
             type=parse_size, default="64MiB")  # fmt: skip
    add_flag(p, "--log-level", "DEBUG, INFO, WARNING", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachesvc",
        description="A tiered cache for serverless code packages: node agents (L1) in "
        "front of L2 peers on a consistent-hash ring in front of an S3 origin.",
        epilog="Every flag can be set as CACHESVC_<FLAG> (e.g. CACHESVC_CACHE_SIZE=20GiB). "
        "Secrets only from the environment: CACHESVC_TOKEN (operator API), "
        "CACHESVC_PEER_TOKEN (between tiers). S3 credentials: the standard AWS variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser(
        "agent",
        help="run the node agent (L1)",
        description="The node agent: GET /pkg/<digest> from local disk, "
        "else from the L2 owner on the ring, else from the origin.",
    )
    _service_flags(agent, DEFAULT_AGENT, "/var/cache/cachesvc/agent")
    add_flag(agent, "--peers", "L2 peers: http://HOST:PORT,... or dns+http://NAME:PORT", default="")
    add_flag(agent, "--code-dir", "where packages are unpacked", type=Path)
    add_flag(
        agent,
        "--max-package-size",
        "largest package to unpack",
        type=parse_size,
        default="2GiB",
    )
    add_flag(
        agent,
        "--max-unpacked-size",
        "largest unpacked tree",
        type=parse_size,
        default="4GiB",
    )
    add_flag(agent, "--max-files", "most files in one package", type=int, default="100000")
    add_flag(
        agent, "--peer-connect-timeout", "seconds to connect to a peer", type=float, default="1"
    )
    agent.set_defaults(run=_run_agent)

    peer = sub.add_parser(
        "peer",
        help="run an L2 cache peer",
        description="An L2 peer: GET /blob/<digest> from its disk, else "
        "from the origin. --peers gives the ring (who owns what, for warm).",
    )
    _service_flags(peer, DEFAULT_PEER, "/var/cache/cachesvc/peer")
    add_flag(peer, "--peers", "the L2 ring including this peer (for warm ownership)", default="")
    add_flag(peer, "--advertise", "this peer's own URL on the ring (default: from --listen)")
    peer.set_defaults(run=_run_peer)

    from cachesvc import commands

    commands.add_client_commands(sub)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return Settings.from_args(args)


def _run_agent(args: argparse.Namespace) -> int:
    from node_agent.app import make_app

    settings = _settings(args)
    return serve([(make_app(settings), settings.listen)], args.shutdown_grace)


def _run_peer(args: argparse.Namespace) -> int:
    from cachesvc.peer import make_app

    settings = _settings(args)
    return serve([(make_app(settings), settings.listen)], args.shutdown_grace)


def serve(
    apps: list[tuple[Any, tuple[str, int]]],
    grace: float = GRACE,
    banner: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> int:
    """Run apps until SIGINT/SIGTERM; then stop accepting, give in-flight
    transfers ``grace`` seconds, and close every store cleanly."""
    from cachesvc.runner import run_until_signal

    return asyncio.run(run_until_signal(apps, grace, banner))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

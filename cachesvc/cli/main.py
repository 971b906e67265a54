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

from cachesvc.config import (
    Settings,
    add_flag,
    check_dir,
    parse_count,
    parse_duration,
    parse_listen,
    parse_log_level,
    parse_origin,
    parse_seconds,
    parse_size,
)
from cachesvc.errors import ConfigError
from cachesvc.fanout.parents import DEFAULT_FANOUT
from cachesvc.serve.egress import parse_rate
from cachesvc.upstream.membership import parse_base_url, peer_list

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
    add_flag(p, "--origin", "s3://BUCKET[/PREFIX] or file:///DIR", type=parse_origin, required=True)
    add_flag(p, "--s3-endpoint", "custom S3 endpoint (MinIO), addressed path-style")
    add_flag(
        p, "--origin-timeout", "seconds for each origin call", type=parse_seconds, default="30"
    )
    add_flag(p, "--max-fetches", "upstream fetches running at once", type=parse_count, default="64")
    add_flag(
        p,
        "--max-queued",
        "fetches waiting for a slot before 503 overloaded",
        type=parse_count,
        default="256",
    )
    add_flag(
        p,
        "--shutdown-grace",
        "seconds to finish in-flight transfers on SIGTERM",
        type=parse_seconds,
        default=str(GRACE),
    )
    add_flag(
        p,
        "--dns-interval",
        "seconds between lookups of a dns+http:// peers name",
        type=parse_seconds,
        default="10",
    )
    add_flag(
        p,
        "--egress-limit",
        "most body bytes per second this process sends, sendfile included (e.g. 100MiB)",
        type=parse_rate,
        default="unlimited",
    )
    add_flag(
        p,
        "--fanout",
        "most other hosts this host feeds one package to at once; 0 = only the ring "
        "owner serves agents (no agent-to-agent transfers)",
        type=parse_count,
        default=str(DEFAULT_FANOUT),
    )
    add_flag(p, "--scrub-interval", "a full re-hash of the store every DURATION (2s, 6h, 1d)",
             type=parse_duration, default="1d")  # fmt: skip
    add_flag(p, "--scrub-rate", "most bytes per second the scrub reads, e.g. 64MiB",
             type=parse_size, default="64MiB")  # fmt: skip
    add_flag(p, "--log-level", "DEBUG, INFO, WARNING, ERROR", type=parse_log_level, default="INFO")


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

    _add_agent(sub)
    _add_peer(sub)

    from cachesvc.cli import commands

    commands.add_client_commands(sub)
    return parser


def _add_agent(sub: Any) -> None:
    agent = sub.add_parser(
        "agent",
        help="run the node agent (L1)",
        description="The node agent: GET /pkg/<digest> from local disk, "
        "else from the L2 owner on the ring, else from the origin.",
    )
    _service_flags(agent, DEFAULT_AGENT, "/var/cache/cachesvc/agent")
    add_flag(
        agent,
        "--peers",
        "L2 peers: http://HOST:PORT,... or dns+http://NAME:PORT",
        type=peer_list,
        default="",
    )
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
    add_flag(agent, "--max-files", "most files in one package", type=parse_count, default="100000")
    add_flag(agent, "--unpack-workers", "unpack processes at once", type=parse_count, default="2")
    add_flag(
        agent, "--unpack-timeout", "seconds one unpack may take", type=parse_seconds, default="300"
    )
    add_flag(agent, "--unpack-memory", "memory one unpack may use", type=parse_size, default="1GiB")
    from cachesvc.cli.bytecode import add_runtime_flag

    add_runtime_flag(agent)
    add_flag(
        agent,
        "--peer-connect-timeout",
        "seconds to connect to a peer",
        type=parse_seconds,
        default="1",
    )
    add_flag(
        agent,
        "--advertise",
        "this agent's URL for other hosts, for fan-out, http://HOST:PORT (default: from "
        "--listen, unless it is a wildcard address)",
        type=parse_base_url,
    )
    agent.set_defaults(run=_run_agent)


def _add_peer(sub: Any) -> None:
    peer = sub.add_parser(
        "peer",
        help="run an L2 cache peer",
        description="An L2 peer: GET /blob/<digest> from its disk, else "
        "from the origin. --peers gives the ring (who owns what, for warm).",
    )
    _service_flags(peer, DEFAULT_PEER, "/var/cache/cachesvc/peer")
    add_flag(
        peer,
        "--peers",
        "the L2 ring including this peer (for warm ownership)",
        type=peer_list,
        default="",
    )
    add_flag(
        peer,
        "--advertise",
        "this peer's own URL on the ring, http://HOST:PORT (default: from --listen)",
        type=parse_base_url,
    )
    peer.set_defaults(run=_run_peer)


def _settings(args: argparse.Namespace) -> Settings:
    """The service's settings, after checking its directories (see :func:`check_dir`)."""
    settings = Settings.from_args(args)
    check_dir("--cache-dir", settings.cache_dir)
    if settings.code_dir is not None:
        check_dir("--code-dir", settings.code_dir)
    logging.basicConfig(
        level=getattr(logging, args.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return settings


def _run_agent(args: argparse.Namespace) -> int:
    from node_agent.app import make_app

    settings = _settings(args)
    return serve([(make_app(settings), settings.listen)], args.shutdown_grace)


def _run_peer(args: argparse.Namespace) -> int:
    from cachesvc.peer.app import make_app

    settings = _settings(args)
    return serve([(make_app(settings), settings.listen)], args.shutdown_grace)


def serve(
    apps: list[tuple[Any, tuple[str, int]]],
    grace: float = GRACE,
    banner: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> int:
    """Run apps until SIGINT/SIGTERM; then stop accepting, give in-flight
    transfers ``grace`` seconds, and close every store cleanly."""
    from cachesvc.serve.runner import run_until_signal

    return asyncio.run(run_until_signal(apps, grace, banner))


def main(argv: list[str] | None = None) -> int:
    """Run one command. A :class:`ConfigError` (a bad flag or ``CACHESVC_*``
    value, an unusable directory, a failed start-up) is one line on stderr and
    exit status 2, never a traceback or a usage dump."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"cachesvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

"""``cachesvc agent`` and ``cachesvc peer``: the two services, which share most
of their flags.

Each command builds one :class:`~cachesvc.config.Settings` from its flags,
checks its directories, finds its app by name (:mod:`cachesvc.serve.registry`)
and serves it until a signal (:func:`cachesvc.serve.runner.serve`). A flag both
services read goes in :func:`_service_flags`; one service's own flag in
:func:`_add_agent` or :func:`_add_peer` (and in ``Settings`` when the service
reads it).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from cachesvc.cli import Commands
from cachesvc.config import (
    Settings,
    add_flag,
    add_repeated_flag,
    check_dir,
    parse_count,
    parse_duration,
    parse_listen,
    parse_log_level,
    parse_origin,
    parse_runtime,
    parse_size,
)
from cachesvc.fanout.parents import DEFAULT_FANOUT
from cachesvc.serve.egress import parse_rate
from cachesvc.serve.registry import AGENT, PEER, load_service
from cachesvc.serve.runner import serve
from cachesvc.upstream.membership import parse_base_url, peer_list

DEFAULT_AGENT = "127.0.0.1:8700"
DEFAULT_PEER = "127.0.0.1:8701"
GRACE = 30.0


def add_to(commands: Commands) -> None:
    _add_agent(commands)
    _add_peer(commands)


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
        p, "--origin-timeout", "seconds for each origin call", type=parse_duration, default="30"
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
        type=partial(parse_duration, zero=True),
        default=str(GRACE),
    )
    add_flag(
        p,
        "--dns-interval",
        "seconds between lookups of a dns+http:// peers name",
        type=parse_duration,
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


def _add_agent(commands: Commands) -> None:
    agent = commands.add_parser(
        AGENT,
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
        agent, "--unpack-timeout", "seconds one unpack may take", type=parse_duration, default="300"
    )
    add_flag(agent, "--unpack-memory", "memory one unpack may use", type=parse_size, default="1GiB")
    add_repeated_flag(
        agent, "--runtime", "a function runtime of this host (repeatable): unpacked trees get "
        "bytecode made by this interpreter, in the background", parse_runtime, "NAME=PATH",
        dest="runtimes",
    )  # fmt: skip
    add_flag(
        agent,
        "--peer-connect-timeout",
        "seconds to connect to a peer",
        type=parse_duration,
        default="1",
    )
    add_flag(
        agent,
        "--advertise",
        "this agent's URL for other hosts, for fan-out, http://HOST:PORT (default: from "
        "--listen, unless it is a wildcard address)",
        type=parse_base_url,
    )
    agent.set_defaults(run=run_service, service=AGENT)


def _add_peer(commands: Commands) -> None:
    peer = commands.add_parser(
        PEER,
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
    peer.set_defaults(run=run_service, service=PEER)


def run_service(args: argparse.Namespace) -> int:
    """Serve ``args.service`` (``agent``, ``peer``) until SIGINT/SIGTERM, then
    drain for ``--shutdown-grace``."""
    settings = _settings(args)
    make_app = load_service(args.service)
    return serve([(make_app(settings), settings.listen)], args.shutdown_grace, args.log_level)


def _settings(args: argparse.Namespace) -> Settings:
    """The service's settings, after checking its directories (see :func:`check_dir`)."""
    settings = Settings.from_args(args)
    check_dir("--cache-dir", settings.cache_dir)
    if settings.code_dir is not None:
        check_dir("--code-dir", settings.code_dir)
    return settings

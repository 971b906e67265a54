"""``cachesvc``: the parser, built from the command modules, and the exit statuses.

Commands: ``agent``, ``peer``, ``publish``, ``fetch``, ``up``, ``warm`` (see
:mod:`cachesvc.cli` for the rule that places each). Every flag can also come
from ``CACHESVC_<FLAG>``; secrets come from the environment only (see
:mod:`cachesvc.config`).
"""

from __future__ import annotations

import argparse
import os
import sys

from cachesvc.cli import CommandFailed, fetch, publish, service, up, warm
from cachesvc.config import DURATION_FORMS
from cachesvc.errors import ConfigError

#: The command modules, in the order ``cachesvc --help`` lists their commands.
COMMANDS = (service, publish, fetch, up, warm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachesvc",
        description="A tiered cache for serverless code packages: node agents (L1) in "
        "front of L2 peers on a consistent-hash ring in front of an S3 origin.",
        epilog="Every flag can be set as CACHESVC_<FLAG> (e.g. CACHESVC_CACHE_SIZE=20GiB). "
        "Secrets only from the environment: CACHESVC_TOKEN (operator API), "
        "CACHESVC_PEER_TOKEN (between tiers). S3 credentials: the standard AWS variables. "
        f"Durations: {DURATION_FORMS}.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_to(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A :class:`ConfigError` (a bad flag or ``CACHESVC_*``
    value, an unusable directory, a failed start-up) is one line on stderr and
    exit status 2, never a traceback or a usage dump; a :class:`CommandFailed`
    is one line and exit status 1."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"cachesvc: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"cachesvc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

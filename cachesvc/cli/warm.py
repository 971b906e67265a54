"""``cachesvc warm``: warm a tenant's packages into agents (L1) or the L2 tier.

``cachesvc warm --tenant T (--agent URL ... | --peers LIST) [--digest D ...]
[--pin] [--timeout S]`` posts one warm job to each target with
``CACHESVC_TOKEN`` and follows them with one progress bar on stderr
(:mod:`cachesvc.warm.client`), then prints a summary table (target, state,
fetched, already cached, not owner, failed, bytes, time) and the failed items.
With ``--peers`` every peer warms the digests it owns, so the L2 tier ends up
with each package once.

Exit status: 0 when every target finished with no failed item; 1 otherwise
(a target unreachable or lost, a job refused, failed items, the timeout); 2
for a usage error, one line ``cachesvc warm: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from cachesvc.cli import Commands
from cachesvc.config import add_flag, env_name, env_value, operator_token, parse_duration
from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError
from cachesvc.upstream.membership import peer_list
from cachesvc.warm.client import peer_targets, print_summary, warm_targets


def add_to(commands: Commands) -> None:
    warm = commands.add_parser(
        "warm",
        help="warm a tenant's packages into agents (L1) or the L2 tier",
        description="Post a warm job to each agent, or to every L2 peer (each warms "
        "what it owns), show progress, print a summary. Needs CACHESVC_TOKEN.",
    )
    add_flag(warm, "--tenant", "tenant whose references (and layers) to warm")
    warm.add_argument(
        "--agent",
        action="append",
        metavar="URL",
        help=f"an agent to warm (repeatable, or comma-separated) [env {env_name('--agent')}]",
    )
    add_flag(
        warm,
        "--peers",
        "warm the L2 tier: http://HOST:PORT,... or dns+http://NAME:PORT",
        type=peer_list,
    )
    warm.add_argument("--digest", action="append", default=[], help="a digest (repeatable)")
    warm.add_argument("--pin", action="store_true", help="pin what is warmed (within pin-share)")
    add_flag(
        warm, "--timeout", "seconds to wait for every target", type=parse_duration, default="600"
    )
    warm.set_defaults(run=run_warm)


def _fail(message: str) -> int:
    print(f"cachesvc warm: {message}", file=sys.stderr)
    return 2


def run_warm(args: argparse.Namespace) -> int:
    token = operator_token()
    agents = _split(args.agent or [env_value("--agent") or ""])
    if not token:
        return _fail("CACHESVC_TOKEN is not set (the operator token of the targets)")
    if bool(agents) == bool(args.peers):
        return _fail("give either --agent URL (one or more) or --peers LIST")
    try:
        digests = [str(Digest.parse(d)) for d in args.digest]
    except CachesvcError as exc:
        return _fail(str(exc))
    if not args.tenant and not digests:
        return _fail("give --tenant T and/or --digest D")
    body: dict[str, Any] = {"pin": args.pin}
    if args.tenant:
        body["tenant"] = args.tenant
    if digests:
        body["digests"] = digests
    return asyncio.run(_warm(agents, args.peers, body, token, args.timeout))


async def _warm(
    agents: list[str], peers: str | None, body: dict[str, Any], token: str, timeout: float
) -> int:
    try:
        targets = agents or await peer_targets(peers or "")
    except (ValueError, OSError) as exc:
        return _fail(f"--peers: {exc}")
    outcomes = await warm_targets(targets, body, token, timeout)
    print_summary(outcomes, sys.stdout)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def _split(values: list[str]) -> list[str]:
    return [u.strip().rstrip("/") for v in values for u in v.split(",") if u.strip()]

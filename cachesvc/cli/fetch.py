"""``cachesvc fetch DIGEST``: download a package through an agent, checked.

Writes the stored bytes (``GET /pkg/DIGEST``, hashed here against the digest),
or with ``--archive`` the archive inside them, compression layers peeled by the
agent, or with ``--unpack`` asks the agent to unpack it and prints its answer.
A file is written beside its name and renamed only when complete and checked;
progress on stderr; a failure is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

import aiohttp

from cachesvc.cli import CommandFailed, Commands
from cachesvc.config import add_flag
from cachesvc.digest import Digest, compare
from cachesvc.errors import CachesvcError
from cachesvc.unpack.codec import Limits, detect_layers
from cachesvc.upstream.membership import parse_base_url


def add_to(commands: Commands) -> None:
    fetch = commands.add_parser(
        "fetch",
        help="download a package through an agent",
        description="GET /pkg/DIGEST from an agent, check its sha256, write it out: "
        "the stored bytes as published (e.g. app.zip.zst), or with --archive the "
        "archive inside them, compression layers peeled (e.g. app.zip).",
    )
    fetch.add_argument("digest", help="sha256:<hex> or <hex>")
    add_flag(
        fetch,
        "--agent",
        "agent base URL, http://HOST:PORT",
        type=parse_base_url,
        default="http://127.0.0.1:8700",
    )
    fetch.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    what = fetch.add_mutually_exclusive_group()
    what.add_argument(
        "--archive",
        action="store_true",
        help="write the inner zip or tar, compression layers peeled by the agent "
        "(GET /pkg/DIGEST/archive), instead of the stored bytes",
    )
    what.add_argument(
        "--unpack", action="store_true", help="ask the agent to unpack it and print where"
    )
    fetch.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    try:
        digest = Digest.parse(args.digest)
        return asyncio.run(_fetch(args, digest))
    except CachesvcError as exc:
        raise CommandFailed(f"fetch {args.digest}: {exc}") from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise CommandFailed(f"fetch {args.digest} from {args.agent}: {why}") from exc


async def _fetch(args: argparse.Namespace, digest: Digest) -> int:
    timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        if args.unpack:
            async with session.post(f"{args.agent}/pkg/{digest}/unpack") as resp:
                body = await resp.json()
                print(json.dumps(body, indent=1))
                if resp.status != 200:
                    raise CommandFailed(f"unpack answered {resp.status}")
                return 0
        if args.archive:
            return await _fetch_archive(session, args.agent, digest, args.output)
        async with session.get(f"{args.agent}/pkg/{digest}") as resp:
            if resp.status != 200:
                raise CommandFailed(f"{resp.status} {await resp.text()}")
            tier = resp.headers.get("X-Cache-Tier", "?")
            size = await _save(resp, args.output, digest)
    layers = await _layers_of(args.output)
    print(f"{digest}: wrote the stored package, {size} bytes from {tier}, "
          f"to {_name(args.output)} ({layers})", file=sys.stderr)  # fmt: skip
    return 0


async def _fetch_archive(
    session: aiohttp.ClientSession, agent: str, digest: Digest, output: Path | None
) -> int:
    """``GET /pkg/{digest}/archive``: the inner zip or tar, layers peeled by the
    agent (which verified the package first; the inner bytes have no digest of
    their own to check here, but a short body is never kept)."""
    async with session.get(f"{agent}/pkg/{digest}/archive") as resp:
        if resp.status != 200:
            raise CommandFailed(f"{resp.status} {await resp.text()}")
        layers = resp.headers.get("X-Package-Layers", "?").split(",")
        size = await _save(resp, output, None)
    peeled = ",".join(layers[:-1]) or "none"
    print(f"{digest}: wrote the inner {layers[-1]} archive, {size} bytes, to {_name(output)} "
          f"(layers {','.join(layers)}; peeled {peeled})", file=sys.stderr)  # fmt: skip
    return 0


def _name(output: Path | None) -> str:
    return str(output) if output is not None else "stdout"


async def _layers_of(output: Path | None) -> str:
    """The stored package's layers, outermost first, read from the written file
    (only the first KiB of each layer are decoded)."""
    if output is None:
        return "layers not read from stdout; --archive peels them"
    try:
        layers = await asyncio.to_thread(detect_layers, output, Limits(max_package_size=1 << 62))
    except CachesvcError as exc:
        return f"layers unknown: {exc}"
    hint = "; --archive writes the inner archive" if len(layers) > 1 else ""
    return f"layers {','.join(layers)}{hint}"


async def _save(resp: aiohttp.ClientResponse, output: Path | None, digest: Digest | None) -> int:
    """Stream the body to ``output`` (or stdout) and return its size.

    A file is written as a hidden ``.part`` beside it and renamed only when the
    body is complete and, with ``digest``, hashes to it; on any failure (a wrong
    body, a short one the agent aborted) the part file is removed.
    """
    h = hashlib.sha256()
    size = 0
    tmp = output.with_name(f".{output.name}.part") if output else None
    out = open(tmp, "wb") if tmp else sys.stdout.buffer  # noqa: SIM115
    try:
        async for chunk in resp.content.iter_chunked(1 << 20):
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
        if digest is not None:
            compare(digest, h, "body")
    except BaseException:
        if tmp:
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp and output:
        out.close()
        tmp.replace(output)
    return size

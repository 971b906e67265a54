"""The client-side commands of ``cachesvc``: ``publish``, ``fetch`` and ``up``.

Each parses its flags, calls into the library and prints what a person or a
script needs (the digest on stdout; progress and errors on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from cachesvc.config import add_flag, check_dir, parse_port
from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError
from cachesvc.upstream.membership import parse_base_url, peer_list


def add_client_commands(sub: Any) -> None:
    pub = sub.add_parser(
        "publish",
        help="store a package in the origin and write its reference",
        description="Upload FILE to blobs/sha256/<hex> (once) and write "
        "tenants/T/F/V.json; prints the digest.",
    )
    pub.add_argument("file", type=Path, help="the package (zip, tar, possibly compressed)")
    add_flag(pub, "--tenant", "tenant name")
    add_flag(pub, "--function", "function name")
    add_flag(pub, "--version", "version name")
    add_flag(pub, "--origin", "s3://BUCKET[/PREFIX] or file:///DIR", required=True)
    add_flag(pub, "--s3-endpoint", "custom S3 endpoint (MinIO), addressed path-style")
    add_flag(
        pub,
        "--compress",
        "add a compression layer before upload, kept only when it makes the package smaller",
        choices=["zstd", "gzip", "xz", "bzip2", "lz4"],
    )
    add_flag(
        pub,
        "--compress-level",
        "level of the --compress layer; defaults zstd 19, gzip 9, xz 6, bzip2 9, lz4 9",
        type=int,
    )
    pub.add_argument(
        "--repack",
        action="store_true",
        help="turn a deflate zip into tar + one strong zstd layer when smaller",
    )
    pub.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="DIGEST",
        help="a dependency layer that travels with the package (repeatable)",
    )
    pub.add_argument(
        "--calls",
        action="append",
        default=[],
        metavar="FUNCTION",
        help="a function this one invokes, for prefetch (repeatable)",
    )
    pub.add_argument(
        "--warm", action="store_true", help="warm it into its L2 owners (--peers) before traffic"
    )
    add_flag(
        pub,
        "--peers",
        "L2 peers for --warm: http://HOST:PORT,... or dns+http://NAME:PORT",
        type=peer_list,
    )
    from cachesvc.cli.bytecode import add_bytecode_flag

    add_bytecode_flag(pub)
    pub.set_defaults(run=_run_publish)

    _add_fetch(sub)
    _add_up(sub)

    from cachesvc.cli.warm import add_command as add_warm_command

    add_warm_command(sub)


def _add_fetch(sub: Any) -> None:
    fetch = sub.add_parser(
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
    fetch.set_defaults(run=_run_fetch)


def _add_up(sub: Any) -> None:
    up = sub.add_parser(
        "up",
        help="run a whole stack on this machine (origin, 3 peers, 1 agent)",
        description="A file:// origin, three L2 peers and one agent on loopback, with a "
        "sample package published; prints curl lines. Ctrl-C stops it.",
    )
    add_flag(up, "--dir", "where origin and caches live (default: a temp dir)", type=Path)
    add_flag(up, "--agent-port", "the agent's port", type=parse_port, default="8700")
    add_flag(up, "--peer-port", "first of three peer ports", type=parse_port, default="8701")
    up.set_defaults(run=_run_up)


def _fail(message: str) -> int:
    print(f"cachesvc: {message}", file=sys.stderr)
    return 1


def _run_publish(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_publish(args))
    except (CachesvcError, ValueError, OSError) as exc:
        return _fail(f"publish {args.file}: {exc}")


async def _publish(args: argparse.Namespace) -> int:
    """Upload the blob; with ``--warm``, warm it into L2 *before* writing the
    reference (the reference is what moves traffic); a failed warm writes none."""
    from cachesvc.publish.upload import publish_blob, reference_key, write_reference
    from cachesvc.upstream.origin import make_origin

    layers = [Digest.parse(d) for d in args.layer]
    _check_compress_flags(args)
    named = args.tenant and args.function and args.version
    key = reference_key(args.tenant, args.function, args.version) if named else None
    origin = make_origin(args.origin, args.s3_endpoint)
    try:
        with tempfile.TemporaryDirectory(prefix="cachesvc-publish-") as tmp:
            path = await asyncio.to_thread(_transform, args, Path(tmp))
            digest, size, uploaded = await publish_blob(origin, path)
        done = "uploaded" if uploaded else "already in the origin"
        print(f"{digest} {size} bytes, {done}", file=sys.stderr)
        if args.warm and not await _prewarm(args.peers or "", [digest, *layers]):
            return _fail(f"warm of {digest} failed: reference {key or '-'} not written")
        if key is not None:
            await write_reference(origin, key, digest, size, layers, args.calls)
            print(f"reference {key} -> {digest}", file=sys.stderr)
    finally:
        await origin.close()
    print(digest)
    return 0


async def _prewarm(peers: str, digests: list[Digest]) -> bool:
    from cachesvc.cli.warm import prewarm_published

    return await prewarm_published(peers, digests, 600)


def _transform(args: argparse.Namespace, tmp: Path) -> Path:
    """Apply --bytecode, --repack and --compress; returns the file to upload."""
    path: Path = args.file
    if args.bytecode:
        from cachesvc.publish.bytecode import with_bytecode

        path = with_bytecode(path, tmp, args.bytecode)
    if args.repack:
        from cachesvc.publish.repack import repack

        out = tmp / "repacked.tar.zst"
        report = repack(path, out)
        choice = "using tar.zst" if report.kept else "keeping the zip (smaller)"
        print(f"repack: zip {report.zip_size} B, zstd over zip {report.zstd_zip_size} B, "
              f"tar.zst {report.tar_zstd_size} B: {choice}", file=sys.stderr)  # fmt: skip
        path = out if report.kept else path
    if args.compress:
        from cachesvc.publish.repack import add_layer

        out = tmp / f"layer.{args.compress}"
        layer = add_layer(path, out, args.compress, args.compress_level)
        print(layer.describe(), file=sys.stderr)
        path = out if layer.kept else path
    return path


def _check_compress_flags(args: argparse.Namespace) -> None:
    """Before any work: a level needs a codec, and must be one the codec takes."""
    from cachesvc.publish.repack import check_level

    if args.compress_level is not None and not args.compress:
        raise ValueError("--compress-level needs --compress")
    if args.compress:
        check_level(args.compress, args.compress_level)


def _run_fetch(args: argparse.Namespace) -> int:
    try:
        digest = Digest.parse(args.digest)
        return asyncio.run(_fetch(args, digest))
    except CachesvcError as exc:
        return _fail(f"fetch {args.digest}: {exc}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _fail(f"fetch {args.digest} from {args.agent}: {type(exc).__name__}: {exc}")


async def _fetch(args: argparse.Namespace, digest: Digest) -> int:
    timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        if args.unpack:
            async with session.post(f"{args.agent}/pkg/{digest}/unpack") as resp:
                body = await resp.json()
                print(json.dumps(body, indent=1))
                return 0 if resp.status == 200 else _fail(f"unpack answered {resp.status}")
        if args.archive:
            return await _fetch_archive(session, args.agent, digest, args.output)
        async with session.get(f"{args.agent}/pkg/{digest}") as resp:
            if resp.status != 200:
                return _fail(f"{resp.status} {await resp.text()}")
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
            return _fail(f"{resp.status} {await resp.text()}")
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
    from cachesvc.unpack.codec import Limits, detect_layers

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
        if digest is not None and h.hexdigest() != digest.hex:
            raise CachesvcError(f"body hashes to sha256:{h.hexdigest()[:12]}, not {digest.short}")
    except BaseException:
        if tmp:
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp and output:
        out.close()
        tmp.replace(output)
    return size


def _run_up(args: argparse.Namespace) -> int:
    from cachesvc.cli.up import run_up

    if args.dir is not None:
        check_dir("--dir", args.dir)
    return run_up(args.dir, args.agent_port, args.peer_port)

"""``cachesvc publish FILE``: store a package in the origin, write its reference.

Applies ``--bytecode``, ``--repack`` (``--indexed``) and ``--compress`` in a
temporary directory, uploads the blob once (:mod:`cachesvc.publish.upload`),
with ``--warm`` warms it into its L2 owners *before* the reference is written
(the reference is what moves traffic), then writes the reference. The digest
goes to stdout; progress to stderr; a failure is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from cachesvc.cli import CommandFailed, Commands
from cachesvc.config import add_flag, operator_token
from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError
from cachesvc.publish.bytecode import with_bytecode
from cachesvc.publish.indexed import repack_indexed
from cachesvc.publish.repack import add_layer, check_level, repack
from cachesvc.publish.upload import publish_blob, reference_key, write_reference
from cachesvc.unpack.index import IndexRef
from cachesvc.upstream.membership import peer_list
from cachesvc.upstream.origin import make_origin
from cachesvc.warm.client import peer_targets, print_summary, warm_targets

WARM_TIMEOUT = 600.0  # seconds for --warm to finish on every peer


def add_to(commands: Commands) -> None:
    pub = commands.add_parser(
        "publish",
        help="store a package in the origin and write its reference",
        description="Upload FILE to blobs/sha256/<hex> (once) and write "
        "tenants/T/F/V.json; prints the digest.",
    )
    pub.add_argument(
        "file", type=Path, help="the package (zip, tar, possibly compressed; a dir with --indexed)"
    )
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
        "--indexed",
        action="store_true",
        help="with --repack: write an indexed tar.zst (a frame per file, an index at the end; "
        "docs/INDEXED.md) from a zip, a tar or a directory, and its index in the reference",
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
    pub.add_argument(
        "--bytecode",
        action="append",
        default=[],
        metavar="PYTHON",
        help="compile the package's .py files with this interpreter (a name on PATH or a "
        "path; repeatable) and ship the pycs in the package",
    )
    pub.set_defaults(run=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_publish(args))
    except (CachesvcError, ValueError, OSError) as exc:
        raise CommandFailed(f"publish {args.file}: {exc}") from exc


async def _publish(args: argparse.Namespace) -> int:
    """Upload the blob; with ``--warm``, warm it into L2 *before* writing the
    reference; a failed warm writes none."""
    layers = [Digest.parse(d) for d in args.layer]
    _check_compress_flags(args)
    named = args.tenant and args.function and args.version
    key = reference_key(args.tenant, args.function, args.version) if named else None
    origin = make_origin(args.origin, args.s3_endpoint)
    try:
        with tempfile.TemporaryDirectory(prefix="cachesvc-publish-") as tmp:
            path, index = await asyncio.to_thread(_transform, args, Path(tmp))
            digest, size, uploaded = await publish_blob(origin, path)
        done = "uploaded" if uploaded else "already in the origin"
        print(f"{digest} {size} bytes, {done}", file=sys.stderr)
        if args.warm and not await _prewarm(args.peers or "", [digest, *layers]):
            raise CommandFailed(f"warm of {digest} failed: reference {key or '-'} not written")
        if key is not None:
            await write_reference(origin, key, digest, size, layers, args.calls, index)
            print(f"reference {key} -> {digest}", file=sys.stderr)
    finally:
        await origin.close()
    print(digest)
    return 0


async def _prewarm(peers: str, digests: list[Digest]) -> bool:
    """Warm a new version into its L2 owners before traffic moves; progress and
    summary on stderr. True when every peer succeeded."""
    token = operator_token()
    if not token:
        print("cachesvc publish: --warm needs CACHESVC_TOKEN", file=sys.stderr)
        return False
    try:
        targets = await peer_targets(peers)
    except (ValueError, OSError) as exc:
        print(f"cachesvc publish: --peers: {exc}", file=sys.stderr)
        return False
    body = {"digests": [str(d) for d in digests], "signal": "publish"}
    outcomes = await warm_targets(targets, body, token, WARM_TIMEOUT)
    print_summary(outcomes, sys.stderr)
    return all(o.ok for o in outcomes)


def _transform(args: argparse.Namespace, tmp: Path) -> tuple[Path, IndexRef | None]:
    """Apply --bytecode, --repack [--indexed] and --compress; returns the file to upload
    and, when indexed, its index (which no compression layer may then hide)."""
    path: Path = args.file
    if args.bytecode:
        path = with_bytecode(path, tmp, args.bytecode)
    if args.indexed:
        indexed = repack_indexed(path, tmp / "indexed.tar.zst")
        print(indexed.describe(), file=sys.stderr)
        return tmp / "indexed.tar.zst", indexed.index
    if args.repack:
        out = tmp / "repacked.tar.zst"
        report = repack(path, out)
        choice = "using tar.zst" if report.kept else "keeping the zip (smaller)"
        print(f"repack: zip {report.zip_size} B, zstd over zip {report.zstd_zip_size} B, "
              f"tar.zst {report.tar_zstd_size} B: {choice}", file=sys.stderr)  # fmt: skip
        path = out if report.kept else path
    if args.compress:
        out = tmp / f"layer.{args.compress}"
        layer = add_layer(path, out, args.compress, args.compress_level)
        print(layer.describe(), file=sys.stderr)
        path = out if layer.kept else path
    return path, None


def _check_compress_flags(args: argparse.Namespace) -> None:
    """Before any work: a level needs a codec, and must be one the codec takes."""
    if args.compress_level is not None and not args.compress:
        raise ValueError("--compress-level needs --compress")
    if args.indexed and (not args.repack or args.compress):
        raise ValueError("--indexed needs --repack, and no --compress (its frames are the layer)")
    if args.compress:
        check_level(args.compress, args.compress_level)

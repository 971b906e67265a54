"""Putting packages into the origin layout (``cachesvc publish``), and the name
rule of tenants, functions and versions. Compresses nothing (repack does) and
warms nothing (the command does, before the reference).

* The digest is computed over the exact bytes uploaded.
* The blob goes to ``blobs/sha256/<hex>`` (skipped when the origin has it at
  that size: blobs are immutable), then the reference
  ``tenants/<t>/<f>/<v>.json``: a reference never points at a missing blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cachesvc.digest import Digest
from cachesvc.errors import InvalidRequest, NotFound
from cachesvc.unpack.index import IndexRef
from cachesvc.upstream.origin import Origin, blob_key

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, value: str) -> str:
    """Tenant, function and version names: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
    if not NAME.fullmatch(value) or value in (".", ".."):
        raise InvalidRequest(f"{kind} {value!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")
    return value


def reference_key(tenant: str, function: str, version: str) -> str:
    names = (check_name("tenant", tenant), check_name("function", function))
    return f"tenants/{names[0]}/{names[1]}/{check_name('version', version)}.json"


def file_digest(path: Path) -> tuple[Digest, int]:
    """sha256 and size of a file, streamed; call from a thread."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return Digest(h.hexdigest()), size


@dataclass(frozen=True)
class Published:
    digest: Digest
    size: int
    reference: str | None
    uploaded: bool


async def publish_blob(origin: Origin, path: Path) -> tuple[Digest, int, bool]:
    """Upload a package file unless the origin has it already."""
    digest, size = await asyncio.to_thread(file_digest, path)
    try:
        if await origin.head(digest) == size:
            return digest, size, False
    except NotFound:
        pass
    await origin.put_file(blob_key(digest), path)
    return digest, size, True


async def write_reference(
    origin: Origin,
    key: str,
    digest: Digest,
    size: int,
    layers: list[Digest] | None = None,
    calls: list[str] | None = None,
    index: IndexRef | None = None,
) -> None:
    """Write ``tenants/<t>/<f>/<v>.json``; the blob must already be in the origin.
    ``index``: the package is indexed (docs/INDEXED.md), and this is its index's
    digest and size, which a reader of the index must trust instead of its bytes."""
    ref: dict[str, object] = {"digest": str(digest), "size": size}
    if index is not None:
        ref["index"] = {"digest": str(index.digest), "size": index.size}
    if layers:
        ref["layers"] = [str(d) for d in layers]
    if calls:
        ref["calls"] = [check_name("function", c) for c in calls]
    await origin.put_text(key, json.dumps(ref, indent=1) + "\n")


async def publish(
    origin: Origin,
    path: Path,
    tenant: str | None = None,
    function: str | None = None,
    version: str | None = None,
    layers: list[Digest] | None = None,
    calls: list[str] | None = None,
    index: IndexRef | None = None,
) -> Published:
    """Upload the blob, then (with tenant/function/version) its reference."""
    key = reference_key(tenant, function, version) if tenant and function and version else None
    digest, size, uploaded = await publish_blob(origin, path)
    if key is not None:
        await write_reference(origin, key, digest, size, layers, calls, index)
    return Published(digest, size, key, uploaded)

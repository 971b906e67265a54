"""Indexed packages for tests: written by the real writer, then taken apart and
put back together with an index a test (or hypothesis) chose.

:func:`split` gives a package's tar frames and its index as JSON;
:func:`rejoin` puts them back with a new index frame and footer and returns
the :class:`IndexRef` a reference would carry for it, so a crafted index
reaches the parser past the digest check, as a hostile publisher's would.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import zstandard

from cachesvc.digest import Digest
from cachesvc.publish.indexed import repack_indexed
from cachesvc.unpack.chunks import Window, read_index
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.frames import compress_frame
from cachesvc.unpack.index import FOOTER, INDEX_MAGIC, SKIPPABLE, Index, IndexRef, footer

FILES = {
    "handler.py": b"def handle(event, context):\n    return {'ok': True}\n",
    "lib/util.py": b"import os\n" * 50,
    "lib/sub/data.bin": bytes(range(256)) * 5000,  # 1.2 MiB: three chunks
    "lib/empty.txt": b"",
    "bin/run": b"#!/bin/sh\nexec python3 handler.py\n",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """``files`` under ``root``; ``bin/*`` executable; mtimes fixed."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if name.startswith("bin/") else 0o644)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    return root


def build(
    tmp: Path, files: dict[str, bytes] | None = None, level: int = 3
) -> tuple[bytes, IndexRef]:
    """An indexed package of ``files`` (default :data:`FILES`) and its index ref."""
    source = write_tree(tmp / "src", FILES if files is None else files)
    report = repack_indexed(source, tmp / "pkg.tar.zst", level=level)
    return (tmp / "pkg.tar.zst").read_bytes(), report.index


def split(package: bytes) -> tuple[bytes, dict[str, object]]:
    """The tar frames of a well-formed package and its index document."""
    _, _, _, offset, length = FOOTER.unpack(package[-FOOTER.size :])
    payload = package[offset + SKIPPABLE.size : offset + length]
    doc = json.loads(zstandard.ZstdDecompressor().decompress(payload))
    return package[:offset], doc


def index_frame(text: bytes) -> bytes:
    payload = compress_frame(text, 3)
    return SKIPPABLE.pack(INDEX_MAGIC, len(payload)) + payload


def rejoin(data: bytes, doc: object) -> tuple[bytes, IndexRef]:
    """``data`` followed by an index frame of ``doc`` (JSON, or raw bytes) and a footer."""
    text = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return with_frame(data, index_frame(text))


def with_frame(data: bytes, frame: bytes) -> tuple[bytes, IndexRef]:
    digest = Digest.parse(hashlib.sha256(frame).hexdigest())
    return data + frame + footer(len(data), len(frame)), IndexRef(digest, len(frame))


def parse_package(package: bytes, ref: IndexRef, limits: Limits | None = None) -> Index:
    """The index as a reader gets it: from one ranged read of the tail."""
    tail_start = max(0, len(package) - ref.tail)
    window = Window(package[tail_start:], tail_start)
    return read_index(window, len(package), ref, limits or Limits())

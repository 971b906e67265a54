"""Whether an unpacked tree is exactly the tree an index describes.

An indexed package holds its tree twice: as tar members, which ``unpack``
extracts, and as index entries, which a lazy mount shows. Our writer makes
them one tree; a hostile publisher can make them two, each within unpack's
rules. A host that moves a function from a mount of the index to the
unpacked tree (next, with the lazy mount) calls :func:`check_tree` first, so
that what the function sees does not change under it.

Guarantee: :func:`check_tree` returns only when the tree under ``root`` has
exactly the index's paths, each of the index's type, with its mode, and for
files its size, mtime and bytes (sha256 of each file, read without following
links); anything else is :class:`UnsafeArchive` naming the first difference.
Blocking (it reads every file once): call from a thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cachesvc.digest import compare
from cachesvc.errors import DigestMismatch, UnsafeArchive
from cachesvc.store.blob import file_sha256
from cachesvc.unpack.index import Entry, Index, Kind
from cachesvc.unpack.tree import show, walk


def check_tree(index: Index, root: Path) -> None:
    """Raise :class:`UnsafeArchive` unless ``root`` holds exactly ``index``'s tree.
    The check the coming lazy mount's host makes before it moves a function
    from the mount to the unpacked tree; only tests call it so far."""
    found = dict(walk(root))
    for entry in index.entries:
        info = found.pop(entry.path, None)
        if info is None:
            raise UnsafeArchive(f"the tar lacks the index's {show(entry.path)}")
        _check(root, entry, info)
    if found:
        raise UnsafeArchive(f"the tar has {show(min(found))}, which its index lacks")


def _check(root: Path, entry: Entry, info: os.stat_result) -> None:
    kind = Kind.DIR if stat.S_ISDIR(info.st_mode) else Kind.FILE
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)) or kind is not entry.kind:
        raise UnsafeArchive(f"{show(entry.path)} is not a {entry.kind.value} as its index says")
    if stat.S_IMODE(info.st_mode) != entry.mode:
        raise UnsafeArchive(f"{show(entry.path)}: mode {stat.S_IMODE(info.st_mode):o}, "
                            f"its index says {entry.mode:o}")  # fmt: skip
    if kind is Kind.DIR:
        return
    if (info.st_size, int(info.st_mtime)) != (entry.size, entry.mtime):
        raise UnsafeArchive(f"{show(entry.path)}: size or mtime is not its index's")
    assert entry.sha256 is not None  # a file always has one
    hashed, _ = file_sha256(root / entry.path)
    try:
        compare(entry.sha256, hashed, show(entry.path))
    except DigestMismatch as exc:
        raise UnsafeArchive(f"the tar's bytes are not its index's: {exc}") from exc

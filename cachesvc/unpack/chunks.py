"""Verified reads of an indexed package: its index from the tail, a chunk or an
entry from its frames. The reader the coming lazy mount calls before it
returns a byte; no mount exists yet, so only tests call it so far
(docs/INDEXED.md, "What a reader checks").

The bytes come from a :class:`Source`: the package file on this host
(:class:`LocalPackage`), or bytes of a range fetched from any tier
(:class:`Window`). No source is trusted: the index is checked against the
:class:`~cachesvc.unpack.index.IndexRef` the caller holds, and every chunk
against the sha256 that index gives it.

Guarantees:

* **Nothing unverified is returned.** :func:`read_chunk` decodes the chunk's
  one frame and compares its sha256 before returning; :func:`iter_entry`
  yields verified chunks and holds back the last one until the whole file's
  sha256 also checks. Bytes that are short, do not decode or hash wrong raise
  :class:`DigestMismatch`: they are wrong bytes, whatever tier sent them.
* **Bounded.** A read decodes one chunk (the index's chunk size, 512 KiB
  from our writer) at a time; :func:`read_range` holds the chunks a range
  covers, :func:`read_entry` one file.

Blocking (reads, decoding, hashing): call from a thread.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cachesvc.digest import compare
from cachesvc.errors import DigestMismatch, UnsupportedFormat
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.frames import decode_frame
from cachesvc.unpack.index import Chunk, Entry, Index, IndexRef, load
from cachesvc.unpack.tree import show


class Source(Protocol):
    """Package bytes by range; may return fewer than asked (the check catches it)."""

    def read_range(self, offset: int, length: int) -> bytes: ...


class Window:
    """Bytes of the package from ``start``: what one ranged read brought (the
    coming lazy mount's source; only tests use it so far)."""

    def __init__(self, data: bytes, start: int) -> None:
        self.data = data
        self.start = start

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < self.start:
            raise ValueError(f"range at {offset} starts before this window ({self.start})")
        at = offset - self.start
        return self.data[at : at + length]


class LocalPackage:
    """The package as a file on this host, read with ``pread``; its size is
    taken once, at open. A context manager; one instance per thread or not.
    A source for the coming lazy mount; only tests use it so far."""

    def __init__(self, path: Path | str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read_range(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        while length > 0:
            data = os.pread(self._fd, length, offset)
            if not data:
                break  # short: the caller's check says so
            parts.append(data)
            offset, length = offset + len(data), length - len(data)
        return b"".join(parts)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> LocalPackage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def read_index(source: Source, package_size: int, trusted: IndexRef, limits: Limits) -> Index:
    """The index of the package, from one read of its last ``trusted.tail`` bytes.
    The reader the coming lazy mount calls first; only tests call it so far."""
    start = max(0, package_size - trusted.tail)
    return load(source.read_range(start, package_size - start), package_size, trusted, limits)


def verify_chunk(entry: Entry, chunk: Chunk, frame: bytes) -> bytes:
    """The bytes of ``chunk`` from ``frame``, its frame as read from some tier,
    once they decode and hash to what the index says; else :class:`DigestMismatch`."""
    what = f"{show(entry.path)} at {chunk.start}"
    if len(frame) != chunk.length:
        raise DigestMismatch(f"{what}: frame of {len(frame)} bytes, the index says {chunk.length}")
    try:
        data = decode_frame(frame, chunk.size, what)
    except UnsupportedFormat as exc:
        raise DigestMismatch(f"wrong bytes for {exc}") from exc
    compare(chunk.sha256, hashlib.sha256(data), what)
    return data


def read_chunk(entry: Entry, number: int, source: Source) -> bytes:
    """Chunk ``number`` of ``entry`` (a file), verified."""
    chunk = entry.chunks[number]
    return verify_chunk(entry, chunk, source.read_range(chunk.offset, chunk.length))


def iter_entry(entry: Entry, source: Source) -> Iterator[bytes]:
    """The bytes of ``entry`` chunk by chunk, each verified; the last chunk comes
    only after the whole file's sha256 checks too. For the coming lazy mount's
    whole-file reads; only tests call it so far."""
    if entry.sha256 is None:
        raise IsADirectoryError(entry.path)
    whole = hashlib.sha256()
    held = b""
    for number in range(len(entry.chunks)):
        data = read_chunk(entry, number, source)
        whole.update(data)
        if held:
            yield held
        held = data
    compare(entry.sha256, whole, show(entry.path))
    if held:
        yield held


def read_range(entry: Entry, offset: int, size: int, source: Source) -> bytes:
    """Up to ``size`` bytes of ``entry`` (a file) from ``offset``, as a ``read``
    of a mounted file asks: only the chunks that cover them are read, each
    verified whole before any byte of it is returned. Past the end: fewer or none.
    The coming lazy mount's ``read``; only tests call it so far."""
    if offset < 0 or size < 0:
        raise ValueError(f"a read of {size} bytes at {offset}")
    end = min(offset + size, entry.size)
    if not entry.chunks or offset >= end:
        return b""
    chunk_size = entry.chunks[0].size if len(entry.chunks) > 1 else entry.size
    first, last = offset // chunk_size, (end - 1) // chunk_size
    data = b"".join(read_chunk(entry, number, source) for number in range(first, last + 1))
    skip = offset - entry.chunks[first].start
    return data[skip : skip + end - offset]


def read_entry(entry: Entry, source: Source) -> bytes:
    """The whole of ``entry`` (a file), verified."""
    return b"".join(iter_entry(entry, source))

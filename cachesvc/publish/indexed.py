"""Indexed repack: a package rewritten as a plain ``tar.zst`` of independent frames
with its index at the end (the format is :mod:`cachesvc.unpack.index`'s).

The source (a zip, a tar with or without compression layers, or a directory)
becomes a tree on disk first: an archive through :func:`cachesvc.unpack.extract.extract`,
so it meets exactly unpack's rules and limits (no links, no ``..``, modes
0644/0755) before a byte is packed; a directory is walked with the same rules
(a link in it is :class:`UnsafeArchive`). Then every entry is written in a
fixed order: directories, then files, each sorted by path components. Each
tar header run (with the previous file's padding) is one zstd frame, each
512 KiB chunk of a file is one frame, the tar's end blocks are one frame;
then the index frame and the footer.

Guarantees:

* **Deterministic.** The same names, bytes, modes and file mtimes give the
  same package, byte for byte: entries sorted, owners 0 and nameless,
  directory mtimes 0, each frame compressed alone (no thread-dependent
  output), the index JSON in a fixed key order. So the digest is stable
  (for one version of the zstd library: another may compress differently).
* **Any tool reads it.** ``tar --zstd -xf`` (or ``zstd -d | tar -x``,
  ``tarfile`` over ``zstandard``) extracts it: zstd decoders pass over
  skippable frames. Our own ``unpack`` does too.
* **Atomic**: ``dst`` appears whole or not at all.

Why 512 KiB chunks: a read of a large file (a ``.so`` mapped page by page)
fetches and decodes one chunk, and 512 KiB is ~5 ms at 100 MiB/s, the chunk
Lambda's container images use; smaller chunks cost ratio and index entries
(a 100 MiB wheel is 200 chunks), larger ones latency. Most files of a
Python package are far smaller, so they are one frame each.

The cost: a frame per file cannot share a dictionary with its neighbours
(plain :func:`cachesvc.publish.repack.repack` can), so the package is larger
(figures in docs/INDEXED.md). Blocking; compresses on every core.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.publish.repack import atomic_output
from cachesvc.unpack.codec import KiB, Limits
from cachesvc.unpack.extract import extract
from cachesvc.unpack.frames import compress_frame
from cachesvc.unpack.index import Chunk, Entry, Index, IndexRef, Kind, encode, footer, load
from cachesvc.unpack.tree import file_mode, member_parts, sane_mtime, show, walk

CHUNK_SIZE = 512 * KiB
DEFAULT_LEVEL = 19
AHEAD = 16
"""Frames compressed ahead of the writer: at most this many chunks in memory."""


@dataclass(frozen=True)
class IndexedReport:
    """What :func:`repack_indexed` wrote; ``index`` goes in the reference."""

    src_size: int
    size: int
    index: IndexRef
    files: int
    bytes: int
    seconds: float

    def describe(self) -> str:
        """One line for people."""
        return (f"indexed repack: {self.src_size} -> {self.size} bytes, {self.files} files "
                f"({self.bytes} bytes), index {self.index.size} bytes {self.index.digest}, "
                f"{self.seconds:.1f} s")  # fmt: skip


def repack_indexed(
    src: Path | str, dst: Path | str, level: int = DEFAULT_LEVEL, limits: Limits | None = None
) -> IndexedReport:
    """Write ``src`` (zip, tar[.gz/.zst/...] or a directory) to ``dst`` as an
    indexed tar.zst; raises unpack's contract errors for what it refuses, and
    :class:`TooLarge` for an output over ``limits.max_package_size`` (no reader
    would take it): ``dst`` is then left as it was."""
    src, dst, limits = Path(src), Path(dst), limits or Limits()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".indexed-", dir=dst.parent) as tmp:
        root = src if src.is_dir() else _unpacked(src, Path(tmp) / "tree", limits)
        members = _walk(root, limits)
        with atomic_output(dst) as out:
            index, ref = _write(root, members, out, level)
            _check_readable(out, ref, limits)
    files = list(index.files)
    unpacked = sum(entry.size for entry in files)
    src_size = unpacked if src.is_dir() else src.stat().st_size
    return IndexedReport(src_size, dst.stat().st_size, ref, len(files), unpacked,
                         time.perf_counter() - started)  # fmt: skip


def _check_readable(out: BinaryIO, ref: IndexRef, limits: Limits) -> None:
    """Read what was written as every reader will (the tail, then the index
    through the parser, under ``limits``), so that no package its readers
    would refuse is ever published: over ``max_package_size``, over the ratio,
    or anything else the parser holds."""
    out.flush()
    size = out.tell()
    if size > limits.max_package_size:
        raise TooLarge(f"the indexed package would be {size} bytes, over the "
                       f"{limits.max_package_size} bytes a reader takes")  # fmt: skip
    tail = os.pread(out.fileno(), ref.tail, size - ref.tail)
    try:
        load(tail, size, ref, limits)
    except (TooLarge, UnsafeArchive, UnsupportedFormat) as exc:
        raise type(exc)(f"the indexed package would be refused by its readers: {exc}") from exc


def _unpacked(src: Path, tree: Path, limits: Limits) -> Path:
    tree.mkdir()
    extract(src, tree, limits)
    return tree


@dataclass(frozen=True)
class _Member:
    path: str
    kind: Kind
    mode: int
    mtime: int
    size: int

    @property
    def order(self) -> tuple[bool, list[str]]:
        """Directories first, then files; each by path components."""
        return self.kind is Kind.FILE, self.path.split("/")


def _walk(root: Path, limits: Limits) -> list[_Member]:
    """Every entry under ``root``, in package order (iterative: any depth)."""
    found: list[_Member] = []
    for rel, info in walk(root):
        found.append(_member(rel, info))
        if len(found) > limits.max_files:
            raise TooLarge(f"{root} has over {limits.max_files} entries")
    if sum(member.size for member in found) > limits.max_unpacked_size:
        raise TooLarge(f"{root} holds over {limits.max_unpacked_size} bytes")
    if not any(member.kind is Kind.FILE for member in found):
        raise UnsupportedFormat(f"{root}: no files to pack")
    return sorted(found, key=lambda member: member.order)


def _member(rel: str, info: os.stat_result) -> _Member:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedFormat(f"name {show(rel)} is not UTF-8") from exc
    member_parts(rel)
    if stat.S_ISDIR(info.st_mode):
        return _Member(rel, Kind.DIR, 0o755, 0, 0)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeArchive(f"links and special files are refused: {show(rel)}")
    mtime = int(sane_mtime(info.st_mtime) or 0)
    return _Member(rel, Kind.FILE, file_mode(info.st_mode), mtime, info.st_size)


@dataclass
class _Slot:
    """Where a frame landed, known once it is written."""

    offset: int = -1
    length: int = -1


class _Frames:
    """Frames compressed on every core, written in the order they were added."""

    def __init__(self, out: BinaryIO, level: int, pool: ThreadPoolExecutor) -> None:
        self.out, self.level, self.pool, self.offset = out, level, pool, 0
        self.window: deque[tuple[Future[bytes], _Slot]] = deque()

    def add(self, data: bytes) -> _Slot:
        slot = _Slot()
        self.window.append((self.pool.submit(compress_frame, data, self.level), slot))
        if len(self.window) > AHEAD:
            self._write_one()
        return slot

    def finish(self) -> int:
        """Write what is pending; the offset after the last frame."""
        while self.window:
            self._write_one()
        return self.offset

    def _write_one(self) -> None:
        future, slot = self.window.popleft()
        frame = future.result()
        self.out.write(frame)
        slot.offset, slot.length = self.offset, len(frame)
        self.offset += len(frame)


@dataclass
class _File:
    member: _Member
    sha256: Digest | None = None
    chunks: list[tuple[_Slot, Digest, int]] = field(default_factory=list)


def _write(root: Path, members: list[_Member], out: BinaryIO, level: int) -> tuple[Index, IndexRef]:
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="indexed") as pool:
        frames = _Frames(out, level, pool)
        written, pad, tar_size = [], b"", 0
        for member in members:
            header = pad + _tar_info(member).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
            frames.add(header)
            written.append(_add_content(root, member, frames))
            pad = bytes(-member.size % tarfile.BLOCKSIZE)
            tar_size += len(header) + member.size
        end = pad + bytes(2 * tarfile.BLOCKSIZE)
        frames.add(end + bytes(-(tar_size + len(end)) % tarfile.RECORDSIZE))
        data_size = frames.finish()
    index = Index(CHUNK_SIZE, data_size, tuple(_entry(item) for item in written))
    blob = encode(index, level)
    out.write(blob)
    out.write(footer(data_size, len(blob)))
    return index, IndexRef(Digest.parse(hashlib.sha256(blob).hexdigest()), len(blob))


def _tar_info(member: _Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.path)
    info.mode, info.mtime, info.uid, info.gid = member.mode, member.mtime, 0, 0
    info.uname = info.gname = ""
    if member.kind is Kind.DIR:
        info.type = tarfile.DIRTYPE
    else:
        info.size = member.size
    return info


def _add_content(root: Path, member: _Member, frames: _Frames) -> _File:
    """Queue the member's chunks as frames, hashing each and the whole."""
    item = _File(member)
    if member.kind is Kind.DIR:
        return item
    whole, size = hashlib.sha256(), 0
    fd = os.open(os.path.join(root, member.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as source:
        while piece := source.read(CHUNK_SIZE):
            whole.update(piece)
            digest = Digest.parse(hashlib.sha256(piece).hexdigest())
            item.chunks.append((frames.add(piece), digest, len(piece)))
            size += len(piece)
    if size != member.size:
        raise CachesvcError(f"{show(member.path)} changed while it was packed")
    item.sha256 = Digest.parse(whole.hexdigest())
    return item


def _entry(item: _File) -> Entry:
    member = item.member
    if item.sha256 is None:
        return Entry(member.path, member.kind, member.mode, member.mtime)
    chunks = tuple(Chunk(slot.offset, slot.length, n * CHUNK_SIZE, size, digest)
                   for n, (slot, digest, size) in enumerate(item.chunks))  # fmt: skip
    return Entry(member.path, Kind.FILE, member.mode, member.mtime, member.size, item.sha256,
                 chunks)  # fmt: skip

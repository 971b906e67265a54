"""Zips into a :class:`~cachesvc.unpack.tree.Tree`: read whole with ``zipfile``,
or, while the package arrives, from its local headers (``stream_unzip``,
CRC-checked) and then checked against its central directory, the only
authority on its members.

* What is kept is always what ``zipfile`` reads: the speculative tree stays
  only if it holds exactly the listed files (names, sizes, CRC-32s), and takes
  the directory's modes and times; anything else discards it and extracts
  again with ``zipfile``.
* The end record's entry count and directory size are checked against the
  limits before ``zipfile`` loads the directory.
* A compressed zip is spooled to an unlinked temp file inside the destination.

Does not decide visibility (the unpacker renames after the verdict).
Blocking: runs in an unpack worker.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import stream_unzip

from cachesvc.errors import CachesvcError, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.fsutil import remove_tree
from cachesvc.unpack.codec import Archive, Limits, MiB
from cachesvc.unpack.tree import Tree, member_parts, show

log = logging.getLogger(__name__)

CENTRAL_DIRECTORY_ENTRY_BUDGET = 1024
"""Zip central-directory bytes allowed per permitted entry (names, extras)."""

Listing = dict[str, tuple[int, int]]  # normalised name -> (size, CRC-32), files only


def zip_entry_claims(fp: BinaryIO) -> tuple[int, int]:
    """(entries, central directory bytes) from the zip's end record, read before zipfile does.

    zipfile loads the whole central directory into memory; these claims let
    us refuse a hostile one first. ``zipfile`` still checks the real records.
    """
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    tail_len = min(size, 22 + 65_535 + 76)
    fp.seek(size - tail_len)
    tail = fp.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise UnsupportedFormat("zip without an end of central directory record")
    entries, cd_size = struct.unpack("<HI", tail[at + 10 : at + 16])
    z64 = at - 20 - 56
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and z64 >= 0:
        if tail[z64 : z64 + 4] == b"PK\x06\x06":
            entries, cd_size = struct.unpack("<QQ", tail[z64 + 32 : z64 + 48])
    return entries, cd_size


def member_kind(info: zipfile.ZipInfo) -> str:
    """``"dir"`` or ``"file"``; raises for nameless, link, device and encrypted members."""
    if not info.filename:  # ZipInfo.is_dir() raises IndexError on it (found by fuzzing)
        raise UnsafeArchive("zip member without a name")
    fmt = stat.S_IFMT(info.external_attr >> 16)
    if fmt == stat.S_IFLNK:
        raise UnsafeArchive(f"link in archive: {show(info.filename)}")
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"device, fifo or socket in archive: {show(info.filename)}")
    if info.flag_bits & 0x1:
        raise UnsupportedFormat(f"encrypted zip member: {show(info.filename)}")
    return "dir" if info.is_dir() or fmt == stat.S_IFDIR else "file"


def zip_mtime(info: zipfile.ZipInfo) -> float | None:
    """The member's DOS timestamp (local time, as ``unzip`` reads it)."""
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _check_claims(stream: BinaryIO, limits: Limits) -> None:
    """Refuse an end record whose claims are over the limits, before zipfile
    reads the directory into memory; leaves the stream at its start."""
    entries, cd_size = zip_entry_claims(stream)
    if entries > limits.max_files:
        raise TooLarge(f"zip claims {entries} entries, over {limits.max_files}")
    if cd_size > limits.max_files * CENTRAL_DIRECTORY_ENTRY_BUDGET + MiB:
        raise TooLarge(f"zip central directory of {cd_size} bytes is over the entry budget")
    stream.seek(0)


def extract_zip(stream: BinaryIO, tree: Tree, limits: Limits) -> None:
    """The whole (seekable) zip into the tree, as its central directory lists it."""
    _check_claims(stream, limits)
    with zipfile.ZipFile(stream) as archive:
        _extract_members(archive, tree, limits)


def _extract_members(archive: zipfile.ZipFile, tree: Tree, limits: Limits) -> None:
    members = archive.infolist()
    if len(members) > limits.max_files:  # the end record may under-count
        raise TooLarge(f"zip has {len(members)} entries, over {limits.max_files}")
    for info in members:
        if member_kind(info) == "dir":
            tree.add_dir(info.filename)
            continue
        with archive.open(info) as member:
            tree.add_file(info.filename, member, info.external_attr >> 16, zip_mtime(info))


def extract_arriving(package: io.RawIOBase, archive: Archive, dest: Path, limits: Limits) -> Tree:
    """Extract the zip of ``archive`` (the forward stream of a package still
    arriving) into ``dest`` as it arrives; see the module docstring."""
    with tempfile.TemporaryFile(dir=dest) as spool:  # unlinked: a crash leaves nothing
        copy: BinaryIO | None = spool if archive.compressions else None
        tree = Tree(dest, limits, archive.packed_size)
        seen = _speculate(_Tee(archive.stream, copy), tree)
        whole = _whole(package, copy)
        _check_claims(whole, limits)
        with zipfile.ZipFile(whole) as zf:
            members = zf.infolist()
            if seen is not None and seen == _listing(members):
                _finish(tree, members)
                return tree
            log.info("unpack: the zip's local headers disagree with its directory; reading again")
            for entry in list(os.scandir(dest)):
                remove_tree(Path(entry.path))
            tree = Tree(dest, limits, archive.packed_size)
            _extract_members(zf, tree, limits)  # the directory already read, not parsed twice
            return tree


class _Tee(io.RawIOBase):
    """Reads the stream forward, copying what it reads into ``copy`` (if any)."""

    def __init__(self, stream: BinaryIO, copy: BinaryIO | None) -> None:
        super().__init__()
        self._stream, self._copy = stream, copy

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        if self._copy is not None:
            self._copy.write(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(MiB):
            pass


def _speculate(tee: _Tee, tree: Tree) -> Listing | None:
    """Extract from the local headers; the listing written, or None when it
    could not be done (the stream is read to its end either way)."""
    seen: Listing = {}
    try:
        for name, _size, chunks in stream_unzip.stream_unzip(
            _chunks(tee), allowed_encryption_mechanisms=(stream_unzip.NO_ENCRYPTION,)
        ):
            text = name.decode("utf-8", "surrogateescape")
            crc = _Crc(chunks)
            if text.endswith("/"):
                tree.add_dir(text)
                crc.drain()
                continue
            tree.add_file(text, crc, 0o644, None)
            seen["/".join(member_parts(text))] = (crc.size, crc.value)
    except (stream_unzip.UnzipError, CachesvcError, ValueError, zlib.error, EOFError) as exc:
        log.info("unpack: streaming the zip stopped (%s); its directory decides", exc)
        tee.drain()
        return None
    tee.drain()
    return seen


def _chunks(tee: _Tee) -> Iterator[bytes]:
    while chunk := tee.read(MiB):
        yield chunk


class _Crc:
    """A member's chunks as a readable, with their size and CRC-32."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._rest = chunks, b""
        self.size = self.value = 0

    def read(self, n: int = -1) -> bytes:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self.size += len(chunk)
            self.value = zlib.crc32(chunk, self.value)
            self._rest = chunk
        data, self._rest = (self._rest, b"") if n < 0 else (self._rest[:n], self._rest[n:])
        return data

    def drain(self) -> None:
        while self.read(MiB):
            pass


def _whole(package: io.RawIOBase, copy: BinaryIO | None) -> BinaryIO:
    """The complete zip, seekable: the spooled copy, or the package itself."""
    if copy is not None:
        copy.seek(0)
        return copy
    package.seek(0)
    return cast(BinaryIO, io.BufferedReader(package))


def _listing(members: list[zipfile.ZipInfo]) -> Listing:
    """What the directory says the tree must hold (refusing what it may not)."""
    listing: Listing = {}
    for info in members:
        if member_kind(info) == "file":
            listing["/".join(member_parts(info.filename))] = (info.file_size, info.CRC)
    return listing


def _finish(tree: Tree, members: list[zipfile.ZipInfo]) -> None:
    """The directory's execute bits and times on the speculatively written files."""
    for info in members:
        if member_kind(info) != "file":
            continue
        path = Path(tree.root, *member_parts(info.filename))
        if info.external_attr >> 16 & 0o111:
            os.chmod(path, 0o755, follow_symlinks=False)
        mtime = zip_mtime(info)
        if mtime is not None:
            os.utime(path, (mtime, mtime), follow_symlinks=False)

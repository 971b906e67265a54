"""Unpacked packages: a package extracted safely into ``<code_dir>/<hex>/``, once.

Public API::

    Unpacker(code_dir, limits)
        .unpack(digest, package_path) -> UnpackResult   # async, coalesced
        .remove(digest)                                  # async, with the package's eviction
        .path_for(digest) -> Path
        .sweep_temp() -> int                             # at startup, before serving
        .aclose()                                        # waits for work in flight
    UnpackResult(digest, path, files, bytes, layers).as_json()

Layout of ``code_dir``: ``<hex>/`` is the tree, exactly the archive's
members; ``<hex>.json`` beside it is the manifest (files, bytes, layers);
``.tmp-*`` are work in progress or leftovers of a crash.

Guarantees:

* **Atomic.** Members are written into a ``.tmp-*`` directory inside
  ``code_dir`` which is renamed to ``<hex>`` as the last step; the manifest
  is written (atomically) just before that rename, so an existing ``<hex>/``
  always has its manifest. A refused or failed package leaves nothing behind.
  No fsync: a process crash is safe, an OS crash may leave short files.
* **Once.** Concurrent calls for one digest share one extraction (a task
  per digest, shielded from callers' cancellation); later calls read the
  manifest. Two processes racing on one ``code_dir`` both extract and one
  rename wins; the loser discards its copy.
* **Never outside the target.** Absolute names, ``..`` components, NUL
  bytes and conflicting entries raise :class:`UnsafeArchive`; so does every
  link (symlink or hardlink, escaping or not: validating link targets
  against links created earlier is a classic source of escapes, and function
  packages rarely need links) and every device, fifo or socket entry. Files
  are created with ``O_EXCL | O_NOFOLLOW``; a duplicate file is refused.
* **Bounded by bytes written.** Unpacked bytes, entries (files and
  directories) and the unpacked/packed ratio are counted while copying, never
  taken from sizes the archive claims, and raise :class:`TooLarge` at once.
  Outer layers are peeled and bounded by :mod:`cachesvc.codec`.
* **Sane modes.** Files are 0644, or 0755 when the archive marks any
  execute bit; directories 0755; never setuid, setgid or sticky. File
  mtimes are kept (so bundled ``.pyc`` files stay valid).

This module does not peel compression (``codec`` does) nor decide when to
evict (the store does, and calls :meth:`Unpacker.remove`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import shutil
import stat
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cachesvc import codec
from cachesvc.codec import Limits, MiB
from cachesvc.digest import Digest
from cachesvc.errors import TooLarge, UnsafeArchive, UnsupportedFormat

TEMP_PREFIX = ".tmp-"
MANIFEST_SUFFIX = ".json"
CENTRAL_DIRECTORY_ENTRY_BUDGET = 1024
"""Zip central-directory bytes allowed per permitted entry (names, extras)."""

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UnpackResult:
    """An unpacked package: where it is and what it holds."""

    digest: Digest
    path: Path
    files: int
    bytes: int
    layers: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """The contract's body: ``{"digest", "path", "files", "bytes", "layers"}``."""
        return {
            "digest": str(self.digest),
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            "layers": list(self.layers),
        }


def _safe_parts(name: str) -> list[str]:
    """The path components of a member name; raises on anything that could escape."""
    if "\x00" in name:
        raise UnsafeArchive(f"member name with a NUL byte: {name!r}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"absolute member path: {name!r}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member path with '..': {name!r}")
    return parts


def _file_mode(archive_mode: int) -> int:
    """0755 when any execute bit is set, else 0644: no setuid, setgid, sticky or o+w."""
    return 0o755 if archive_mode & 0o111 else 0o644


class _Tree:
    """A temp directory being filled with archive members, within the limits.

    Owns the safety of every path it creates and the counting of entries and
    bytes written. Call from a thread.
    """

    def __init__(self, root: Path, limits: Limits, packed_size: int) -> None:
        self.root = str(root)
        self.files = 0
        self.bytes = 0
        self._entries = 0
        self._limits = limits
        self._packed_size = packed_size
        self._dirs: set[str] = {""}

    def add_dir(self, name: str) -> None:
        self._count_entry()
        parts = _safe_parts(name)
        if parts:
            self._ensure_dir(parts)

    def add_file(self, name: str, src: BinaryIO, archive_mode: int, mtime: float | None) -> None:
        self._count_entry()
        parts = _safe_parts(name)
        if not parts:
            raise UnsafeArchive(f"file entry without a name: {name!r}")
        self._ensure_dir(parts[:-1])
        self._write("/".join(parts), src, _file_mode(archive_mode), mtime)
        self.files += 1

    def _write(self, rel: str, src: BinaryIO, mode: int, mtime: float | None) -> None:
        try:
            fd = os.open(os.path.join(self.root, rel), _OPEN_FLAGS, 0o600)
        except (FileExistsError, IsADirectoryError) as exc:
            raise UnsafeArchive(f"duplicate or conflicting entry: {rel}") from exc
        try:
            while chunk := src.read(MiB):
                self._account(len(chunk))
                view = memoryview(chunk)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)

    def _ensure_dir(self, parts: list[str]) -> None:
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel in self._dirs:
                continue
            path = os.path.join(self.root, *parts[:depth])
            try:
                os.mkdir(path)
            except FileExistsError as exc:
                raise UnsafeArchive(f"directory conflicts with a file: {rel}") from exc
            os.chmod(path, 0o755)
            self._dirs.add(rel)

    def _count_entry(self) -> None:
        self._entries += 1
        if self._entries > self._limits.max_files:
            raise TooLarge(f"archive has over {self._limits.max_files} entries")

    def _account(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self._limits.max_unpacked_size:
            raise TooLarge(f"unpacks to over {self._limits.max_unpacked_size} bytes")
        if not self._limits.ratio_allows(self.bytes, self._packed_size):
            raise TooLarge(
                f"unpacks over {self._limits.max_ratio}x its {self._packed_size} packed bytes"
            )


def _zip_entry_claims(fp: BinaryIO) -> tuple[int, int]:
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


def _zip_member_kind(info: zipfile.ZipInfo) -> str:
    """``"dir"`` or ``"file"``; raises for links, devices and encrypted members."""
    fmt = stat.S_IFMT(info.external_attr >> 16)
    if fmt == stat.S_IFLNK:
        raise UnsafeArchive(f"link in archive: {info.filename!r}")
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"device, fifo or socket in archive: {info.filename!r}")
    if info.flag_bits & 0x1:
        raise UnsupportedFormat(f"encrypted zip member: {info.filename!r}")
    return "dir" if info.is_dir() or fmt == stat.S_IFDIR else "file"


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    """The member's DOS timestamp (local time, as ``unzip`` reads it)."""
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _extract_zip(stream: BinaryIO, tree: _Tree, limits: Limits) -> None:
    entries, cd_size = _zip_entry_claims(stream)
    if entries > limits.max_files:
        raise TooLarge(f"zip claims {entries} entries, over {limits.max_files}")
    if cd_size > limits.max_files * CENTRAL_DIRECTORY_ENTRY_BUDGET + MiB:
        raise TooLarge(f"zip central directory of {cd_size} bytes is over the entry budget")
    stream.seek(0)
    with zipfile.ZipFile(stream) as archive:
        if len(archive.infolist()) > limits.max_files:  # the end record may under-count
            raise TooLarge(f"zip has {len(archive.infolist())} entries, over {limits.max_files}")
        for info in archive.infolist():
            if _zip_member_kind(info) == "dir":
                tree.add_dir(info.filename)
                continue
            with archive.open(info) as member:
                tree.add_file(info.filename, member, info.external_attr >> 16, _zip_mtime(info))


_TAR_BLOCK = 512
_TAR_FILES = (b"0", b"\x00", b"7")  # regular, old regular, contiguous
_TAR_LINKS = (b"1", b"2")
_TAR_DEVICES = (b"3", b"4", b"6")  # char, block, fifo
_TAR_META_MAX = MiB
"""Largest PAX or GNU long-name record we read (names are at most 4 KiB on Linux)."""


class _TarData:
    """Exactly ``size`` bytes of one member from the tar stream, then the padding skipped."""

    def __init__(self, reader: io.BufferedReader, size: int) -> None:
        self._reader = reader
        self._left = size
        self._padding = -size % _TAR_BLOCK

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = self._reader.read(want) if want else b""
        if len(data) < want:
            raise UnsupportedFormat("truncated tar member")
        self._left -= len(data)
        return data

    def finish(self) -> None:
        while self.read(MiB):
            pass
        if len(self._reader.read(self._padding)) < self._padding:
            raise UnsupportedFormat("truncated tar padding")


def _tar_number(field: bytes) -> int:
    """An octal header field, or GNU base-256 (high bit set) for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\x00", 1)[0].strip() or b"0", 8)
    except ValueError as exc:
        raise UnsupportedFormat(f"bad tar header number {field!r}") from exc


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a PAX extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\x00":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tar_header(block: bytes) -> tuple[str, bytes, int, int, int]:
    """(name, type, size, mode, mtime) of a verified ustar/GNU/v7 header block."""
    stored = _tar_number(block[148:156])
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise UnsupportedFormat("tar header checksum mismatch")
    name = block[:100].split(b"\x00", 1)[0]
    prefix = block[345:500].split(b"\x00", 1)[0]
    if block[257:263] == b"ustar\x00" and prefix:
        name = prefix + b"/" + name
    size, mode, mtime = (_tar_number(block[a:b]) for a, b in ((124, 136), (100, 108), (136, 148)))
    return name.decode("utf-8", "surrogateescape"), block[156:157], size, mode, mtime


def _extract_tar(stream: BinaryIO, tree: _Tree) -> None:
    """Read ustar, GNU and PAX tar forward, straight into the tree.

    Our own reader, not ``tarfile``: it is twice as fast on packages of
    thousands of small files, and it only knows what we accept (regular
    files and directories; PAX ``path``/``size``/``mtime``; GNU long names).
    Every byte comes through the codec's bounded stages.
    """
    reader = io.BufferedReader(stream, buffer_size=MiB)  # type: ignore[arg-type]
    pending: dict[str, str] = {}
    while (block := reader.read(_TAR_BLOCK)) and block != bytes(_TAR_BLOCK):
        if len(block) < _TAR_BLOCK:
            raise UnsupportedFormat("truncated tar header")
        name, kind, size, mode, mtime = _tar_header(block)
        data = _TarData(reader, size)
        if kind in (b"x", b"g", b"L", b"K"):
            pending.update(_tar_meta(kind, data, size))
            data.finish()
            continue
        name = pending.get("path", name)
        size = int(pending.get("size", size))
        mtime_f = float(pending.get("mtime", mtime))
        if any(key.startswith("GNU.sparse") for key in pending):
            raise UnsupportedFormat(f"sparse tar member: {name!r}")
        pending.clear()
        _tar_member(tree, name, kind, _TarData(reader, size), mode, mtime_f)


def _tar_meta(kind: bytes, data: _TarData, size: int) -> dict[str, str]:
    """What a PAX header or GNU long-name record says about the next member."""
    if size > _TAR_META_MAX:
        raise UnsupportedFormat(f"tar metadata record of {size} bytes")
    raw = data.read()
    if kind == b"x":
        return _pax_records(raw)
    if kind == b"L":
        return {"path": raw.rstrip(b"\x00").decode("utf-8", "surrogateescape")}
    return {}  # "g" global headers and "K" long link names change nothing we keep


def _tar_member(
    tree: _Tree, name: str, kind: bytes, data: _TarData, mode: int, mtime: float
) -> None:
    if kind in _TAR_FILES:
        tree.add_file(name, data, mode, mtime)  # type: ignore[arg-type]
    elif kind == b"5":
        tree.add_dir(name)
    elif kind in _TAR_LINKS:
        raise UnsafeArchive(f"link in archive: {name!r}")
    elif kind in _TAR_DEVICES:
        raise UnsafeArchive(f"device, fifo or special entry in archive: {name!r}")
    else:
        raise UnsupportedFormat(f"tar entry type {kind!r} for {name!r}")
    data.finish()


def extract(package_path: Path, dest: Path, limits: Limits) -> tuple[int, int, tuple[str, ...]]:
    """Extract the package into the existing empty ``dest``: (files, bytes, layers).

    Raises :class:`UnsafeArchive`, :class:`TooLarge` or
    :class:`UnsupportedFormat`; on error ``dest`` holds partial output that
    the caller removes. Blocking: call from a thread.
    """
    with codec.open_archive(package_path, limits, spool_dir=dest.parent) as archive:
        tree = _Tree(dest, limits, archive.packed_size)
        try:
            if archive.kind == "zip":
                _extract_zip(archive.stream, tree, limits)
            else:
                _extract_tar(archive.stream, tree)
        # RuntimeError: zipfile's unknown compression methods and encrypted members.
        except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
            raise UnsupportedFormat(f"corrupt {archive.kind}: {exc}") from exc
        return tree.files, tree.bytes, archive.layers


@dataclass
class _Flight:
    kind: str  # "unpack" or "remove"
    task: asyncio.Task[Any]


class Unpacker:
    """Unpacked trees under one ``code_dir``; see the module docstring for guarantees."""

    def __init__(self, code_dir: Path, limits: Limits | None = None) -> None:
        self.code_dir = Path(code_dir)
        self.limits = limits or Limits()
        self._flights: dict[Digest, _Flight] = {}
        self.code_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: Digest) -> Path:
        """Where the package's tree lives once unpacked."""
        return self.code_dir / digest.hex

    async def unpack(self, digest: Digest, package_path: Path) -> UnpackResult:
        """Unpack once and answer what is there; concurrent callers share the work.

        ``package_path`` must hold the verified bytes of ``digest``. A
        caller's cancellation does not cancel the shared extraction.
        """
        while (flight := self._flights.get(digest)) is not None:
            if flight.kind == "unpack":
                return await asyncio.shield(flight.task)  # type: ignore[no-any-return]
            await asyncio.wait([flight.task])
        task = self._start(digest, "unpack", self._unpack_sync, digest, Path(package_path))
        return await asyncio.shield(task)  # type: ignore[no-any-return]

    async def remove(self, digest: Digest) -> None:
        """Remove the tree and its manifest after any extraction in flight; no-op if absent."""
        while (flight := self._flights.get(digest)) is not None:
            await asyncio.wait([flight.task])
        await asyncio.shield(self._start(digest, "remove", self._remove_sync, digest))

    async def aclose(self) -> None:
        """Wait for every extraction and removal in flight (their errors are dropped)."""
        tasks = [flight.task for flight in self._flights.values()]
        await asyncio.gather(*tasks, return_exceptions=True)

    def sweep_temp(self) -> int:
        """Remove leftover ``.tmp-*`` entries and orphan manifests; return how many.

        Call at startup, before any :meth:`unpack`: it would remove work in
        progress. Blocking.
        """
        removed = 0
        for entry in os.scandir(self.code_dir):
            orphan = entry.name.endswith(MANIFEST_SUFFIX) and not os.path.isdir(
                entry.path[: -len(MANIFEST_SUFFIX)]
            )
            if entry.name.startswith(TEMP_PREFIX) or orphan:
                _remove_path(Path(entry.path))
                removed += 1
        return removed

    def _start(
        self, digest: Digest, kind: str, fn: Callable[..., Any], *args: Any
    ) -> asyncio.Task[Any]:
        flight = _Flight(kind, asyncio.ensure_future(asyncio.to_thread(fn, *args)))
        self._flights[digest] = flight

        def done(task: asyncio.Task[Any]) -> None:
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            if not task.cancelled():
                task.exception()  # retrieved here: every caller may have gone

        flight.task.add_done_callback(done)
        return flight.task

    def _manifest_path(self, digest: Digest) -> Path:
        return self.code_dir / (digest.hex + MANIFEST_SUFFIX)

    def _unpack_sync(self, digest: Digest, package_path: Path) -> UnpackResult:
        existing = self._existing(digest)
        if existing is not None:
            return existing
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{digest.hex[:16]}-", dir=self.code_dir))
        try:
            files, size, layers = extract(package_path, tmp, self.limits)
            result = UnpackResult(digest, self.path_for(digest), files, size, layers)
            self._write_manifest(result)
            os.chmod(tmp, 0o755)
            return self._commit(tmp, result)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, tmp: Path, result: UnpackResult) -> UnpackResult:
        """Rename the temp tree into place; if another process won, keep theirs."""
        try:
            os.rename(tmp, result.path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    def _existing(self, digest: Digest) -> UnpackResult | None:
        """The manifest of an unpacked tree; a tree without one is removed as damaged."""
        path = self.path_for(digest)
        if not path.is_dir():
            return None
        try:
            data = json.loads(self._manifest_path(digest).read_text())
            return UnpackResult(digest, path, data["files"], data["bytes"], tuple(data["layers"]))
        except (OSError, ValueError, KeyError, TypeError):
            self._remove_sync(digest)
            return None

    def _write_manifest(self, result: UnpackResult) -> None:
        body = json.dumps(result.as_json()).encode()
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=MANIFEST_SUFFIX, dir=self.code_dir)
        with open(fd, "wb") as out:
            out.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self._manifest_path(result.digest))

    def _remove_sync(self, digest: Digest) -> None:
        trash = self.code_dir / f"{TEMP_PREFIX}rm-{digest.hex[:16]}-{os.urandom(4).hex()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path_for(digest), trash)
            shutil.rmtree(trash)
        self._manifest_path(digest).unlink(missing_ok=True)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

"""A tree being written from archive members: the only code that creates paths
from them. :func:`member_parts` is the name rule; :class:`Tree` writes members
under one root, within the limits; :func:`walk` lists a tree on disk (for the
indexed writer and :func:`cachesvc.unpack.agree.check_tree`). Reads no archive
(:mod:`cachesvc.unpack.extract` does); makes no link, device or fifo (callers
refuse them).

* Never outside the root: NUL, absolute names (``/x``, ``\\x``, ``C:x``) and
  ``..`` are ``UnsafeArchive``; names past 4096 bytes, 255 per component or
  :data:`MAX_DEPTH` levels are ``UnsupportedFormat``, before any system call.
  Files are created ``O_EXCL | O_NOFOLLOW``: a duplicate or conflict is refused.
* Bounded by bytes written (entries, bytes, ratio), never by sizes an archive
  claims: ``TooLarge`` at once.
* Files 0644 (0755 if any execute bit), directories 0755, never setuid,
  setgid or sticky; a member's mtime kept only when it is a real time.
* An ``OSError`` becomes a contract error (no space or ``RLIMIT_FSIZE``:
  ``TooLarge``; a conflict: ``UnsafeArchive``; a refused name:
  ``UnsupportedFormat``); a fault of this host stays a 500.

Blocking: call from the unpack worker.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cachesvc.errors import CachesvcError, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.codec import Limits, MiB

PATH_MAX = 4096
NAME_MAX = 255
MAX_DEPTH = 256
"""Most path components in a member name. Linux allows ~2,000 (PATH_MAX), but
recursive tools (``shutil.rmtree``, Python 3.11's ``os.walk``) fail near 1,000
levels, and no code package needs more than a few dozen."""
MTIME_RANGE = (-(2**31), 2**34)
"""Member mtimes we keep: 1901 to 2514; others are ignored (never an error)."""

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# errno of a failed write -> the contract error it means for this package.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the disk or a limit is full
_CONFLICT = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENOTEMPTY}
_BAD_NAME = {errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL}


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def show(name: str) -> str:
    """A member name for error text: quoted, at most 200 characters."""
    text = repr(name)
    return text if len(text) <= 200 else text[:197] + "..."


def member_parts(name: str) -> list[str]:
    """The path components of a member name; raises, naming the rule, for any
    name that could leave the root or that Linux cannot hold."""
    if "\x00" in name:
        raise UnsafeArchive(f"member name with a NUL byte: {show(name)}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"absolute member path: {show(name)}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member path with '..': {show(name)}")
    if len(os.fsencode(name)) > PATH_MAX:
        raise UnsupportedFormat(f"member name over {PATH_MAX} bytes: {show(name)}")
    if any(len(os.fsencode(part)) > NAME_MAX for part in parts):
        raise UnsupportedFormat(f"member name with a part over {NAME_MAX} bytes: {show(name)}")
    if len(parts) > MAX_DEPTH:
        raise UnsupportedFormat(f"member path over {MAX_DEPTH} levels deep: {show(name)}")
    return parts


def file_mode(archive_mode: int) -> int:
    """0755 when any execute bit is set, else 0644: no setuid, setgid, sticky or o+w."""
    return 0o755 if archive_mode & 0o111 else 0o644


def sane_mtime(value: float | None) -> float | None:
    """``value`` when ``os.utime`` can take it and it is a plausible time, else None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (OverflowError, ValueError):
        return None
    low, high = MTIME_RANGE
    return seconds if math.isfinite(seconds) and low <= seconds < high else None


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every path under ``root`` (relative, ``/``-joined) with its ``lstat``,
    in no set order. Never follows a link: only real directories are entered.
    Iterative, so of any depth; lazy, so a caller that refuses an entry stops
    the walk before it enters it."""
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(os.path.join(root, rel_dir)) as listing:
            for item in listing:
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                info = item.stat(follow_symlinks=False)
                yield rel, info
                if stat.S_ISDIR(info.st_mode):
                    pending.append(rel)


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` of writing ``what`` into the contract error it means."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise TooLarge(f"writing {what}: {exc.strerror}") from exc
        if exc.errno in _CONFLICT:
            raise UnsafeArchive(f"duplicate or conflicting entry {what}") from exc
        if exc.errno in _BAD_NAME:
            raise UnsupportedFormat(f"writing {what}: {exc.strerror}") from exc
        raise CachesvcError(f"writing {what} into the code dir: {exc}") from exc


class Tree:
    """A directory being filled with archive members, within the limits.

    Owns the safety of every path it creates and the counting of entries and
    bytes written. Blocking; one thread at a time.
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
        """Create the directory ``name`` (and its parents); repeats are fine."""
        self._count_entry()
        parts = member_parts(name)
        if parts:
            self._ensure_dir(parts)

    def add_file(self, name: str, src: Readable, archive_mode: int, mtime: float | None) -> None:
        """Write ``src`` to the new file ``name``; a second file of one name is refused."""
        self._count_entry()
        parts = member_parts(name)
        if not parts:
            raise UnsafeArchive(f"file entry without a name: {show(name)}")
        self._ensure_dir(parts[:-1])
        rel = "/".join(parts)
        self._write(rel, src, file_mode(archive_mode), sane_mtime(mtime))
        self.files += 1

    def _write(self, rel: str, src: Readable, mode: int, mtime: float | None) -> None:
        """Only the system calls are mapped by :func:`writing`: an error of reading
        ``src`` (a corrupt member) is the reader's to name."""
        what = show(rel)
        with writing(what):
            fd = os.open(os.path.join(self.root, rel), _OPEN_FLAGS, 0o600)
        try:
            while chunk := src.read(MiB):
                self._account(len(chunk))
                with writing(what):
                    _write_all(fd, chunk)
            with writing(what):
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
            with writing(f"directory {show(rel)}"):
                os.mkdir(os.path.join(self.root, rel), 0o755)
                os.chmod(os.path.join(self.root, rel), 0o755)  # whatever the umask
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may write less than asked
        view = view[os.write(fd, view) :]

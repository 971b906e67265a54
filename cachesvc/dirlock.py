"""One owner per directory: ``flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.lock``,
which holds the owner's pid, so a second owner fails at once naming the pid.

* Exclusive across processes and within one (flock is per open file
  description); close-on-exec, so a child never prolongs it.
* Released by the kernel however the owner exits (kill -9 included); the lock
  file is never removed (that would let two processes lock two files).
* Never follows a link: anything but a regular file named ``.lock`` is replaced.

Rejected: ``lockf``/POSIX locks are per process and dropped by closing any
descriptor of the file; an O_EXCL pid file needs stale-pid guessing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from cachesvc.errors import ConfigError
from cachesvc.fsutil import remove_tree

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class DirLock:
    """The lock on one directory, held until :meth:`release`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, directory: Path, what: str) -> DirLock:
        """Create ``directory`` if needed and lock it. ``what`` names it in
        errors ("cache dir", "code dir"). Raises :class:`ConfigError` when
        another owner holds it, OSError (naming the path) when it cannot be
        made. Blocking (mkdir, open): call from a thread."""
        _make_dir(directory, what)
        fd = _open_lock_file(directory / LOCK_NAME, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(
                    f"{what} {directory} is in use by pid {holder} (lock {directory / LOCK_NAME})"
                ) from None
            raise ConfigError(f"{what} {directory}: cannot lock {LOCK_NAME}: {exc}") from exc
        _write_pid(fd)
        return cls(fd)

    def release(self) -> None:
        """Unlock; idempotent. The file stays (see the module docstring)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # closing the only descriptor releases the flock


def _make_dir(directory: Path, what: str) -> None:
    """Raises OSError naming the path (the runner prints it as one line)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exist_ok covers directories only
        raise ConfigError(f"{what} {directory}: not a directory") from None


def _open_lock_file(path: Path, what: str) -> int:
    """Open (creating) the lock file; replace whatever non-file is there. The
    lstat first keeps us from even opening a device or fifo left there."""
    for _ in range(3):  # bounded: a racing process could replace it again
        if not _file_or_absent(path):
            log.warning("%s %s: %s is not a regular file: replacing it", what, path.parent, path)
            remove_tree(path)
        try:
            fd = os.open(path, _FLAGS, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR):
                raise ConfigError(f"{what} {path.parent}: cannot open {path}: {exc}") from exc
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
    raise ConfigError(f"{what} {path.parent}: {path} keeps being replaced by a non-file")


def _file_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:  # absent, or unreadable: the open below says which
        return True


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _write_pid(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # the lock holds without the pid: it only helps the message
        log.warning("cannot write the pid into the lock file: %s", exc)

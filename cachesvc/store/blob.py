"""A committed package file, open and shared by the requests that lease it. The
store alone acquires and retires it; a lease is given back with
:meth:`Blob.release`. The file closes when it is neither kept hot nor leased.
Files are opened and hashed here without following a link or blocking on a
fifo; :func:`open_file` refuses anything but a regular file of the expected size.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cachesvc.digest import Digest, Hashed

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
HASH_BLOCK = 1 << 20


class Blob:
    """An open package file. The file stays open while leased and closes when
    it is neither cached as hot by the store nor leased.

    ``generation`` tells one commit of a digest from a later one, so a verdict
    on this file never lands on a fresh copy committed meanwhile.
    """

    __slots__ = ("digest", "size", "file", "generation", "_leases", "_retired")

    def __init__(self, digest: Digest, size: int, file: io.FileIO, generation: int) -> None:
        self.digest = digest
        self.size = size
        self.file = file  # raw FileIO: fileno() for sendfile, pread via os
        self.generation = generation
        self._leases = 0
        self._retired = False

    def acquire(self) -> None:
        self._leases += 1

    def release(self) -> None:
        self._leases -= 1
        if self._retired and self._leases == 0:
            self.file.close()

    def retire(self) -> None:
        """No new leases; close once the last one ends."""
        self._retired = True
        if self._leases == 0:
            self.file.close()


def open_file(path: Path, size: int) -> io.FileIO:
    """Open a blob for reading: a regular file of ``size`` bytes, never through a
    link. Raises OSError saying what was wrong. Blocking."""
    fd = os.open(path, READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise OSError(f"{path}: not a regular file of {size} bytes (mode {st.st_mode:o}, "
                          f"{st.st_size} bytes)")  # fmt: skip
        return io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: Path) -> tuple[Hashed, int]:
    """Hash a file (never through a link); returns the hash and the bytes read.
    Raises OSError. Blocking."""
    sha256 = hashlib.sha256()
    size = 0
    fd = os.open(path, READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        for block in _blocks(fd):
            sha256.update(block)
            size += len(block)
    finally:
        os.close(fd)
    return sha256, size


def _blocks(fd: int) -> Iterator[bytes]:
    while block := os.read(fd, HASH_BLOCK):
        yield block

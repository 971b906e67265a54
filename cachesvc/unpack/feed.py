"""Feeding an unpack worker a package while its bytes are still arriving.

Unpacking a package that is not yet local used to wait for the whole
download, then extract: time to runnable code was their sum. Here the worker
starts at the first bytes and reads the package file *as it grows*:

* **Parent side**, :func:`readable_ends`: the package's spans
  (:meth:`cachesvc.readpath.package.Package.spans`) become "readable up to N"
  numbers; :class:`Feed` writes them as lines on a pipe the worker reads.
* **Worker side**, :class:`GrowingFile`: a read-only, seekable file over the
  package's open descriptor, whose reads block at the readable end until the
  next line arrives.

Guarantees: the last byte of a package becomes readable only after its
sha256 verdict (spans hold it back), so a worker that read the file to its
end read verified bytes only; a bad verdict, or any failure of the fill,
closes the pipe early and the worker's next read past what it was told
raises. The worker also drains the file to its end before it answers (a tar
reader may stop before the trailing bytes). Nothing here decides what an
extraction may see: the unpacker renames its tree into place only after the
verdict.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncGenerator

from cachesvc.errors import TooLarge, UnsupportedFormat
from cachesvc.readpath.package import FileSpan, Package

LINE_MAX = 32  # bytes of one "readable up to N" line


class FeedBroken(OSError):
    """The package stopped arriving (its fill failed, or the parent gave up)."""


async def readable_ends(package: Package) -> AsyncGenerator[tuple[int, int], None]:
    """(fd of the package's file, bytes readable from its start), as they grow.

    Every span of one package comes from one file (the fill's file, renamed
    into the store when kept; or the stored blob). A package the store could
    not keep (its bytes pass through memory only) cannot be unpacked.
    """
    async for span in package.spans(0, package.size):
        if not isinstance(span, FileSpan):
            raise TooLarge(f"{package.digest.short} could not be kept in L1 to work on")
        yield span.file.fileno(), span.offset + span.count


class Feed:
    """The parent's end of the pipe: non-blocking writes of readable ends."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    @classmethod
    async def open(cls, write_fd: int) -> Feed:
        loop = asyncio.get_running_loop()
        pipe = open(write_fd, "wb", buffering=0, closefd=True)  # noqa: SIM115 (the transport owns it)
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe)
        return cls(transport)

    def readable(self, end: int) -> None:
        self._transport.write(b"%d\n" % end)

    def close(self) -> None:
        self._transport.close()


class GrowingFile(io.RawIOBase):
    """The package file, in the worker: reads wait until the parent says the
    bytes are there; ``size`` is the whole package's (for the codec's limits)."""

    def __init__(self, fd: int, control: int, size: int) -> None:
        super().__init__()
        self.fd, self.size = fd, size
        self._control = control
        self._pending = b""
        self._readable = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"seek to {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self.size:
            return 0
        while self._pos >= self._readable:
            self._wait()
        want = min(len(buffer), self._readable - self._pos)
        got = os.preadv(self.fd, [memoryview(buffer)[:want]], self._pos)
        if got == 0:
            raise UnsupportedFormat(f"the package file ended at {self._pos} of {self.size}")
        self._pos += got
        return got

    def drain(self) -> None:
        """Wait until the whole package was readable: the parent's verdict."""
        while self._readable < self.size:
            self._wait()

    def _wait(self) -> None:
        """Block for the next line (the latest of those pending counts)."""
        while b"\n" not in self._pending:
            data = os.read(self._control, 4096)
            if not data:
                raise FeedBroken("the package stopped arriving (its fetch failed)")
            self._pending += data
            if len(self._pending) > 4096 * LINE_MAX:
                raise FeedBroken("the feed sent nonsense")
        *lines, self._pending = self._pending.split(b"\n")
        self._readable = max(self._readable, *(int(line) for line in lines))
        if self._readable > self.size:
            raise FeedBroken(f"told {self._readable} bytes of a {self.size}-byte package")

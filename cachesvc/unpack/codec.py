"""Package layers: detection by magic bytes and a bounded streaming decoder
stack. Names the layers outermost first (``X-Package-Layers``) and peels them;
never trusts a file name, never touches archive members or paths
(:mod:`cachesvc.unpack.extract` and :mod:`cachesvc.unpack.tree` do).

* zstd, gzip, xz, bzip2, lz4 frame around zip or tar, at most
  ``limits.max_depth`` layers; anything else, or corrupt data met while
  decoding, is ``UnsupportedFormat``. Concatenated streams decode whole.
* Nothing whole in memory: bounded reads; zstd windows capped at 128 MiB.
* Every layer's output is bounded by ``Limits.max_decoded_size`` and by
  ``max_ratio`` against package bytes read so far (the first
  :data:`RATIO_FLOOR` count as read): ``TooLarge`` as soon as crossed. A
  package over ``max_package_size`` is refused before decoding.

Blocking: call from a thread, except :func:`archive_stream` (it hops itself).
Rejected: decompressor objects driven by hand (httpx's ``MultiDecoder``)
buffer a whole ``decompress(chunk)``; the stdlib file wrappers bound each ``read(n)``.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import gzip
import io
import lzma
import os
import queue
import tempfile
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lz4.frame
import zstandard

from cachesvc.errors import CachesvcError, TooLarge, UnsupportedFormat

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

RATIO_FLOOR = 1 * MiB
"""Input bytes assumed read when checking the ratio of a very small package."""

TAR_ENTRY_OVERHEAD = 2 * KiB
"""Tar framing allowed per entry (header, padding, long-name records)."""

ZSTD_MAX_WINDOW = 1 << 27
"""128 MiB: the largest zstd window we agree to allocate (``zstd --long``'s)."""

READ_AHEAD_CHUNKS = 4
"""Decoded MiB a read-ahead thread may hold before the caller takes them."""

HEAD_SIZE = 512
"""Bytes sniffed per layer: a tar header block, ``ustar`` sits at offset 257."""

COMPRESSIONS = ("zstd", "gzip", "xz", "bzip2", "lz4")
ARCHIVES = ("zip", "tar")

_DECODE_ERRORS = (
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    EOFError,
    OSError,  # gzip.BadGzipFile, bz2 "Invalid data stream"
    RuntimeError,  # lz4.frame
    ValueError,
)


@dataclass(frozen=True)
class Limits:
    """The contract's package limits; every bound here raises :class:`TooLarge`."""

    max_package_size: int = 2 * GiB
    max_unpacked_size: int = 4 * GiB
    max_files: int = 100_000
    max_ratio: int = 200
    max_depth: int = 4

    def __post_init__(self) -> None:
        for name in ("max_package_size", "max_unpacked_size", "max_files", "max_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")
        if self.max_depth < 0:
            raise ValueError("Limits.max_depth must not be negative")

    @property
    def max_decoded_size(self) -> int:
        """Largest inner archive accepted: the unpacked limit plus tar framing."""
        return self.max_unpacked_size + self.max_files * TAR_ENTRY_OVERHEAD + MiB

    def ratio_allows(self, output: int, packed: int) -> bool:
        """True when ``output`` bytes from ``packed`` package bytes is within ``max_ratio``."""
        return output <= self.max_ratio * max(packed, RATIO_FLOOR)


def sniff(head: bytes) -> str | None:
    """Name the format whose magic bytes start ``head``, or None."""
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and len(head) >= 4:
        return "bzip2"
    if head.startswith(b"\x04\x22\x4d\x18"):
        return "lz4"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if _is_tar_header(head):
        return "tar"
    return None


def _is_tar_header(head: bytes) -> bool:
    """A ustar/GNU magic, or (old v7 tar) a header block whose checksum adds up."""
    if len(head) < HEAD_SIZE:
        return False
    if head[257:262] == b"ustar":
        return True
    field = head[148:156].replace(b"\x00", b" ").strip()
    try:
        expected = int(field, 8)
    except ValueError:
        return False
    return expected == sum(head[:148]) + 8 * 0x20 + sum(head[156:HEAD_SIZE])


class _Stage(io.RawIOBase):
    """One layer's output: counted, bounded, and peekable for sniffing.

    The bottom stage reads the package file and counts the bytes that feed
    the ratio check; every stage above it checks its own output against
    ``max_decoded_size`` and ``max_ratio`` on every read.
    """

    def __init__(self, name: str, source: BinaryIO, limits: Limits, bottom: _Stage | None):
        super().__init__()
        self.name = name
        self.output = 0
        self._source = source
        self._limits = limits
        self._bottom = bottom
        self._pending = b""

    def readable(self) -> bool:
        return True

    def peek_head(self) -> bytes:
        """The first :data:`HEAD_SIZE` bytes (fewer at EOF), left unread."""
        while len(self._pending) < HEAD_SIZE:
            more = self._pull(HEAD_SIZE - len(self._pending))
            if not more:
                break
            self._pending += more
        return self._pending[:HEAD_SIZE]

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(MiB), b""))
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return self._pull(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _pull(self, size: int) -> bytes:
        data = self._read_source(size)
        self.output += len(data)
        self._check()
        return data

    def _read_source(self, size: int) -> bytes:
        try:
            return self._source.read(size)
        except CachesvcError:
            raise
        except _DECODE_ERRORS as exc:
            if self._bottom is None:
                raise CachesvcError(f"read package: {exc}") from exc
            raise UnsupportedFormat(f"corrupt {self.name} layer: {exc}") from exc

    def _check(self) -> None:
        if self._bottom is None:
            if self.output > self._limits.max_package_size:
                raise TooLarge(f"package is over {self._limits.max_package_size} bytes")
            return
        if self.output > self._limits.max_decoded_size:
            raise TooLarge(
                f"{self.name} layer decodes to over {self._limits.max_decoded_size} bytes"
            )
        if not self._limits.ratio_allows(self.output, self._bottom.output):
            raise TooLarge(
                f"{self.name} layer expands over {self._limits.max_ratio}x "
                f"({self.output} bytes from {self._bottom.output})"
            )


class _ReadAhead(io.RawIOBase):
    """Chunks of ``source`` read by a worker thread into a bounded queue.

    At most :data:`READ_AHEAD_CHUNKS` chunks wait; an error in the worker is
    raised by every later :meth:`read`. :meth:`close` stops and joins the
    worker, so the source is never read after it returns.
    """

    def __init__(self, source: io.RawIOBase) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(READ_AHEAD_CHUNKS)
        self._stop = threading.Event()
        self._chunk = b""
        self._error: BaseException | None = None
        self._eof = False
        self._worker = threading.Thread(target=self._run, args=(source,), name="codec-read-ahead")
        self._worker.start()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(MiB), b""))
        if not self._chunk and not self._eof:
            self._next()
        if size >= len(self._chunk):
            data, self._chunk = self._chunk, b""
        else:
            data, self._chunk = self._chunk[:size], self._chunk[size:]
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stop.set()
        self._worker.join()
        super().close()

    def _next(self) -> None:
        if self._error is None:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._error = item
            else:
                self._chunk, self._eof = item, not item
        if self._error is not None:
            raise self._error

    def _run(self, source: io.RawIOBase) -> None:
        try:
            while not self._stop.is_set():
                data = source.read(MiB)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader's thread
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue


def _zstd_reader(src: BinaryIO) -> BinaryIO:
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return decompressor.stream_reader(src, read_size=MiB, read_across_frames=True, closefd=False)


# Any: the stdlib's decompressor files are BufferedIOBase, not typing.BinaryIO.
_DECODERS: dict[str, Callable[[BinaryIO], Any]] = {
    "zstd": _zstd_reader,
    "gzip": lambda src: gzip.GzipFile(fileobj=src, mode="rb"),
    "xz": lambda src: lzma.LZMAFile(src, format=lzma.FORMAT_XZ),
    "bzip2": lambda src: bz2.BZ2File(src),
    "lz4": lambda src: lz4.frame.LZ4FrameFile(src),
}


@dataclass(frozen=True)
class Archive:
    """An opened package: its layers and a binary stream of the zip or tar inside.

    ``stream`` is seekable when it came from :func:`open_archive` and the
    archive is a zip; otherwise it is read-only and forward-only.
    ``packed_size`` is the package's size on disk.
    """

    layers: tuple[str, ...]
    stream: BinaryIO
    packed_size: int

    @property
    def kind(self) -> str:
        """``"zip"`` or ``"tar"``: the last layer."""
        return self.layers[-1]

    @property
    def compressions(self) -> tuple[str, ...]:
        """The compression layers only, outermost first."""
        return self.layers[:-1]


Package = Path | str | io.RawIOBase
"""A package to read: its path, or a file already open at offset 0 (its size is
then ``os.fstat``'s, or its ``size`` attribute: a file still being written,
see :class:`cachesvc.unpack.worker.GrowingFile`)."""


def _open_package(path: Package, limits: Limits, stack: contextlib.ExitStack) -> tuple[_Stage, int]:
    """The bottom stage over the package file, and the file's size."""
    raw: Any
    if isinstance(path, io.RawIOBase):
        raw = path
        size = getattr(raw, "size", None)
        if size is None:
            size = os.fstat(raw.fileno()).st_size
    else:
        raw = stack.enter_context(open(path, "rb", buffering=0))
        size = os.fstat(raw.fileno()).st_size
    if size > limits.max_package_size:
        raise TooLarge(f"package is {size} bytes, over {limits.max_package_size}")
    return _Stage("package", raw, limits, None), size


def _peel(bottom: _Stage, limits: Limits, stack: contextlib.ExitStack) -> tuple[list[str], _Stage]:
    """Sniff and wrap decoders until an archive shows up; return layers and its stage."""
    layers: list[str] = []
    stage = bottom
    while True:
        kind = sniff(stage.peek_head())
        if kind is None:
            where = f"inside {','.join(layers)}" if layers else "package"
            raise UnsupportedFormat(f"{where}: not zip, tar or a known compression")
        layers.append(kind)
        if kind in ARCHIVES:
            return layers, stage
        if len(layers) > limits.max_depth:
            raise UnsupportedFormat(f"more than {limits.max_depth} compression layers")
        decoder = stack.enter_context(_DECODERS[kind](stage))  # type: ignore[arg-type]
        stage = _Stage(kind, decoder, limits, bottom)


def detect_layers(path: Path | str, limits: Limits | None = None) -> list[str]:
    """The package's layers, outermost first, ending in ``"zip"`` or ``"tar"``.

    Decodes only the first few KiB of each layer. Raises
    :class:`UnsupportedFormat` or :class:`TooLarge`. Call from a thread.
    """
    limits = limits or Limits()
    with contextlib.ExitStack() as stack:
        bottom, _ = _open_package(Path(path), limits, stack)
        layers, _ = _peel(bottom, limits, stack)
        return layers


@contextlib.contextmanager
def open_stream(path: Package, limits: Limits | None = None) -> Iterator[Archive]:
    """Open the package as a forward-only stream of its inner archive.

    The stream stops with :class:`TooLarge` when a bound is crossed and with
    :class:`UnsupportedFormat` on corrupt data. When there are compression
    layers, a read-ahead thread decodes up to :data:`READ_AHEAD_CHUNKS` MiB
    ahead of the caller (the C decoders release the GIL, so decoding and
    extracting overlap on two cores). Call from a thread.
    """
    limits = limits or Limits()
    with contextlib.ExitStack() as stack:
        bottom, size = _open_package(path if isinstance(path, io.RawIOBase) else Path(path),
                                     limits, stack)  # fmt: skip
        layers, top = _peel(bottom, limits, stack)
        stream: io.RawIOBase = top
        if len(layers) > 1:  # decode in a second thread while the caller consumes
            stream = stack.enter_context(contextlib.closing(_ReadAhead(top)))
        yield Archive(tuple(layers), stream, size)  # type: ignore[arg-type]


@contextlib.contextmanager
def open_archive(
    path: Path | str, limits: Limits | None = None, spool_dir: Path | str | None = None
) -> Iterator[Archive]:
    """Open the package for extraction: a seekable stream for zip, a stream for tar.

    A zip needs random access: when it sits inside compression layers, they
    are peeled into an anonymous temp file in ``spool_dir`` (unlinked at
    once, so nothing outlives a crash), bounded by ``max_decoded_size``. A
    zip with no layers is the package file itself. Call from a thread.
    """
    with open_stream(path, limits) as archive:
        if archive.kind == "tar":
            yield archive
        elif not archive.compressions:
            with open(path, "rb") as plain:
                yield Archive(archive.layers, plain, archive.packed_size)
        else:
            with tempfile.TemporaryFile(dir=spool_dir) as spool:
                _copy(archive.stream, spool)
                spool.seek(0)
                yield Archive(archive.layers, spool, archive.packed_size)


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    while chunk := src.read(MiB):
        dst.write(chunk)


class ArchiveStream:
    """Async chunks of a package's inner archive; each read runs in a worker thread.

    One read is in flight at a time, so the stream is never touched by two
    threads, and a slow consumer holds back decoding (no unbounded buffer).
    """

    def __init__(self, archive: Archive, chunk_size: int) -> None:
        self.layers = archive.layers
        self._stream = archive.stream
        self._chunk_size = chunk_size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await asyncio.to_thread(self._stream.read, self._chunk_size):
            yield chunk


@contextlib.asynccontextmanager
async def archive_stream(
    path: Path | str, limits: Limits | None = None, chunk_size: int = 256 * KiB
) -> AsyncIterator[ArchiveStream]:
    """Open the package's inner archive for ``GET /pkg/{digest}/archive``.

    Detection runs before this yields, so :class:`UnsupportedFormat` and
    :class:`TooLarge` from the headers surface before any response starts;
    later ones surface from iteration (the handler then aborts the body).
    """
    manager = open_stream(path, limits)
    archive = await asyncio.to_thread(manager.__enter__)
    try:
        yield ArchiveStream(archive, chunk_size)
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)

"""Publisher transforms: add a compression layer, or repack a zip as tar.zst.

Public API::

    compress(src, dst, fmt="zstd", level=None) -> int       # dst size
    repack(src_zip, dst, level=19) -> RepackReport

Both stream (nothing whole in memory) and write ``dst`` atomically (a temp
file beside it, then rename): a failure leaves no partial ``dst``. Both
block: ``cachesvc publish`` calls them before uploading, from a thread if it
runs an event loop.

Why repack: a zip compresses each member alone, so the thousands of small,
similar files of a Python package never share a dictionary. One zstd stream
over a tar with long-distance matching (window 2**27, the largest our
decoder accepts) compresses across members; decoding stays fast at any level.

Formats are the layer names of :mod:`cachesvc.codec`; what ``compress``
writes, ``codec`` reads. This module does not upload, hash or verify.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import stat
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lz4.frame
import zstandard

from cachesvc.codec import COMPRESSIONS, ZSTD_MAX_WINDOW, MiB
from cachesvc.errors import UnsafeArchive, UnsupportedFormat

DEFAULT_LEVELS = {"zstd": 19, "gzip": 9, "xz": 6, "bzip2": 9, "lz4": 9}


def zstd_compressor(level: int = 19) -> zstandard.ZstdCompressor:
    """A strong zstd compressor: long-distance matching, 128 MiB window, all cores."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        enable_ldm=True,
        window_log=ZSTD_MAX_WINDOW.bit_length() - 1,
        threads=-1,
    )
    return zstandard.ZstdCompressor(compression_params=params)


# Any: the stdlib's compressor files are BufferedIOBase, not typing.BinaryIO.
_WRITERS: dict[str, Callable[[BinaryIO, int], Any]] = {
    "zstd": lambda dst, level: zstd_compressor(level).stream_writer(dst, closefd=False),
    "gzip": lambda dst, level: gzip.GzipFile(fileobj=dst, mode="wb", compresslevel=level, mtime=0),
    "xz": lambda dst, level: lzma.LZMAFile(dst, "wb", format=lzma.FORMAT_XZ, preset=level),
    "bzip2": lambda dst, level: bz2.BZ2File(dst, "wb", compresslevel=level),
    "lz4": lambda dst, level: lz4.frame.LZ4FrameFile(dst, "wb", compression_level=level),
}


@contextlib.contextmanager
def _atomic_output(dst: Path) -> Iterator[BinaryIO]:
    """A temp file beside ``dst`` that replaces it only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with open(fd, "wb") as out:
            yield out
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compress(src: Path | str, dst: Path | str, fmt: str = "zstd", level: int | None = None) -> int:
    """Write ``src`` wrapped in one ``fmt`` layer to ``dst``; return dst's size.

    ``fmt`` is one of :data:`cachesvc.codec.COMPRESSIONS`; ``level`` defaults
    to the format's strongest sensible level (:data:`DEFAULT_LEVELS`).
    Raises :class:`UnsupportedFormat` for another format. Blocking, streaming.
    """
    if fmt not in COMPRESSIONS:
        raise UnsupportedFormat(f"cannot compress as {fmt!r}; use one of {', '.join(COMPRESSIONS)}")
    dst = Path(dst)
    with open(src, "rb") as source, _atomic_output(dst) as out:
        with _WRITERS[fmt](out, DEFAULT_LEVELS[fmt] if level is None else level) as writer:
            while chunk := source.read(MiB):
                writer.write(chunk)
    return dst.stat().st_size


@dataclass(frozen=True)
class RepackReport:
    """Sizes of one package three ways; ``kept`` says whether ``dst`` was written."""

    zip_size: int
    zstd_zip_size: int
    tar_zstd_size: int
    kept: bool

    @property
    def best(self) -> str:
        """The smallest form: ``"zip"``, ``"zstd,zip"`` or ``"zstd,tar"``."""
        sizes = {"zip": self.zip_size, "zstd,zip": self.zstd_zip_size}
        sizes["zstd,tar"] = self.tar_zstd_size
        return min(sizes, key=lambda form: sizes[form])


class _Counter:
    """A write-only sink that only counts."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def _zstd_size(path: Path, level: int) -> int:
    """Size of ``path`` under one zstd layer, computed without writing it."""
    counter = _Counter()
    with open(path, "rb") as source:
        zstd_compressor(level).copy_stream(source, counter, read_size=MiB)
    return counter.size


def _tar_info(info: zipfile.ZipInfo) -> tarfile.TarInfo:
    """The tar header for a zip member: same name, mode bits and mtime; owner root."""
    unix_mode = info.external_attr >> 16
    fmt = stat.S_IFMT(unix_mode)
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"repack refuses links and special files: {info.filename!r}")
    entry = tarfile.TarInfo(info.filename.rstrip("/"))
    entry.mtime = int(time.mktime((*info.date_time, 0, 0, -1)))
    if info.is_dir() or fmt == stat.S_IFDIR:
        entry.type, entry.mode = tarfile.DIRTYPE, 0o755
    else:
        entry.size = info.file_size
        entry.mode = 0o755 if unix_mode & 0o111 else 0o644
    return entry


def _write_tar_zstd(src_zip: Path, out: BinaryIO, level: int) -> None:
    with (
        zipfile.ZipFile(src_zip) as archive,
        zstd_compressor(level).stream_writer(out, closefd=False) as writer,
        tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for info in archive.infolist():
            entry = _tar_info(info)
            if entry.isdir():
                tar.addfile(entry)
                continue
            with archive.open(info) as member:
                tar.addfile(entry, member)


def repack(src_zip: Path | str, dst: Path | str, level: int = 19) -> RepackReport:
    """Turn a zip into one tar with a strong zstd layer; keep it only when smaller.

    ``dst`` is written (atomically) only when the tar.zst is smaller than
    the zip; the report also gives zstd-over-zip for comparison. Members keep
    names, order, execute bits and mtimes; links or special files raise
    :class:`UnsafeArchive`. Blocking, streaming, uses every core.
    """
    src_zip, dst = Path(src_zip), Path(dst)
    zip_size = src_zip.stat().st_size
    zstd_zip_size = _zstd_size(src_zip, level)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with open(fd, "wb") as out:
            _write_tar_zstd(src_zip, out, level)
        tar_zstd_size = os.stat(tmp).st_size
        kept = tar_zstd_size < zip_size
        if kept:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return RepackReport(zip_size, zstd_zip_size, tar_zstd_size, kept)

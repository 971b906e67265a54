"""Publisher transforms: add a compression layer, or repack a zip as tar.zst.

Both stream (nothing whole in memory) and write ``dst`` atomically (a temp
file beside it, then rename): a failure leaves no partial ``dst``. Both
block: ``cachesvc publish`` calls them before uploading, from a thread if it
runs an event loop.

Why repack: a zip compresses each member alone, so the thousands of small,
similar files of a Python package never share a dictionary. One zstd stream
over a tar with long-distance matching (window 2**27, the largest our
decoder accepts) compresses across members; decoding stays fast at any level.

Formats are the layer names of :mod:`cachesvc.unpack.codec`; what ``compress``
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
from typing import Any, BinaryIO, cast

import lz4.frame
import zstandard

from cachesvc.errors import UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.codec import COMPRESSIONS, ZSTD_MAX_WINDOW, MiB

# Per codec: (lowest, highest, default) level. Defaults are strong where decoding
# stays fast whatever the level (zstd, gzip, bzip2, lz4 HC); xz stays at its own
# default 6: 7-9 need hundreds of MiB to compress and up to 64 MiB to decode.
LEVELS: dict[str, tuple[int, int, int]] = {
    "zstd": (1, 22, 19),
    "gzip": (1, 9, 9),
    "xz": (0, 9, 6),
    "bzip2": (1, 9, 9),
    "lz4": (0, 16, 9),
}
DEFAULT_LEVELS = {fmt: default for fmt, (_low, _high, default) in LEVELS.items()}
# zstd jobs run on every core. zstd's own job size at a 2**27 window is 4x the
# window (512 MiB), so a package below that was one job on one core (64 MiB at
# level 19: ~21 s). Jobs of 8 MiB, each seeing the 8 MiB before it
# (overlap_log 5 = window/16) besides its own long-distance matches. Measured
# on the corpus's boto3 zip (17 MiB), against one job: +0.05 % in size, the
# busiest thread 2.3 s of CPU instead of 5.1 s, all threads 4.5 s instead of
# 5.5 s; as tar.zst (repack) +0.10 %. Rejected: 16 MiB jobs (a 17 MiB package
# is a 16 MiB job and a 1 MiB one: one core again); 4 MiB jobs with 4 MiB of
# overlap (+0.11 % / +0.18 %, hardly faster); overlap_log 9 (the whole
# window: every job re-reads 128 MiB before it).
ZSTD_JOB = 8 * MiB
ZSTD_OVERLAP_LOG = 5
# A layer is tried at the chosen level only when a fast pass of the same codec
# (these levels) shrinks the input at all: random or already-compressed bytes
# are recognised in ~0.2 s per 64 MiB (zstd), not after ~20 s at level 19 that
# end in a layer ~1.5 KB *larger* than its input. A heuristic: a stronger level
# can find a little where the fastest finds nothing, and that little is given
# up. The codec's own fast level, not zstd's for all: zstd cannot shrink bytes
# that are random over 200 symbols, which gzip shrinks by 3.5 %. xz and bzip2
# have no fast level worth the name: they are compressed in full, then compared.
PROBE_LEVELS = {"zstd": 1, "gzip": 1, "lz4": 0}


def _known(fmt: str) -> str:
    if fmt not in COMPRESSIONS:
        raise UnsupportedFormat(f"cannot compress as {fmt!r}; use one of {', '.join(COMPRESSIONS)}")
    return fmt


def check_level(fmt: str, level: int | None) -> int:
    """``level``, or ``fmt``'s default when None; :class:`ValueError` naming the
    range when ``level`` is outside what ``fmt`` takes. ``fmt`` must be known."""
    low, high, default = LEVELS[fmt]
    if level is None:
        return default
    if not low <= level <= high:
        raise ValueError(f"{fmt} levels are {low}..{high} (default {default}), not {level}")
    return level


def zstd_compressor(level: int = 19) -> zstandard.ZstdCompressor:
    """A strong zstd compressor: long-distance matching, 128 MiB window, all
    cores (jobs of :data:`ZSTD_JOB`)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        enable_ldm=True,
        window_log=ZSTD_MAX_WINDOW.bit_length() - 1,
        threads=-1,
        job_size=ZSTD_JOB,
        overlap_log=ZSTD_OVERLAP_LOG,
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
def atomic_output(dst: Path) -> Iterator[BinaryIO]:
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

    ``fmt`` is one of :data:`cachesvc.unpack.codec.COMPRESSIONS` (else
    :class:`UnsupportedFormat`); ``level`` defaults to the format's
    (:data:`LEVELS`; outside its range, :class:`ValueError`). Always writes
    ``dst``, even when larger: :func:`add_layer` decides whether to keep it.
    Blocking, streaming; zstd uses every core, the others one (Python's gzip,
    lzma and bz2 have no threads; lz4 is fast enough without).
    """
    level = check_level(_known(fmt), level)
    dst = Path(dst)
    with atomic_output(dst) as out:
        _write_layer(src, out, fmt, level)
    return dst.stat().st_size


def _write_layer(src: Path | str, sink: BinaryIO, fmt: str, level: int) -> None:
    """``src`` through one ``fmt`` writer into ``sink``, 1 MiB at a time."""
    with open(src, "rb") as source, _WRITERS[fmt](sink, level) as writer:
        while chunk := source.read(MiB):
            writer.write(chunk)


@dataclass(frozen=True)
class LayerReport:
    """What :func:`add_layer` did: ``kept`` means ``dst`` holds the layer.

    ``size`` is the layer's size, or None when the fast probe showed the input
    cannot shrink and the layer was never computed."""

    fmt: str
    level: int
    src_size: int
    size: int | None
    kept: bool
    seconds: float

    def describe(self) -> str:
        """One line for people: what was kept or skipped, and why."""
        what, as_is = f"{self.fmt} level {self.level}", "uploading them as they are"
        if self.size is None:
            fast = f"{self.fmt} level {PROBE_LEVELS[self.fmt]}"
            return (f"skipped the {what} layer: a fast pass ({fast}) could not shrink "
                    f"{self.src_size} bytes (random or already compressed); {as_is}")  # fmt: skip
        if not self.kept:
            return (f"skipped the {what} layer: {self.size} bytes is not smaller than "
                    f"{self.src_size}; {as_is}")  # fmt: skip
        saved = f"-{100 * (1 - self.size / self.src_size):.1f} %, {self.seconds:.1f} s"
        return f"compressed {self.src_size} -> {self.size} bytes ({what}, {saved})"


def add_layer(
    src: Path | str, dst: Path | str, fmt: str = "zstd", level: int | None = None
) -> LayerReport:
    """Wrap ``src`` in one ``fmt`` layer into ``dst``, and keep ``dst`` only when
    it is smaller than ``src`` (a layer that does not shrink the package only
    costs every agent a decode). When not kept, ``dst`` does not exist.

    Input that a fast pass of the codec (:data:`PROBE_LEVELS`) cannot shrink at
    all is not compressed at ``level``: the report's ``size`` is then None.
    Blocking.
    """
    level = check_level(_known(fmt), level)
    src, dst = Path(src), Path(dst)
    src_size = src.stat().st_size
    started = time.perf_counter()
    probe = PROBE_LEVELS.get(fmt)
    if probe is not None and _layer_size(src, fmt, probe) >= src_size:
        return LayerReport(fmt, level, src_size, None, False, time.perf_counter() - started)
    size = compress(src, dst, fmt, level)
    kept = size < src_size
    if not kept:
        dst.unlink()
    return LayerReport(fmt, level, src_size, size, kept, time.perf_counter() - started)


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


def _layer_size(path: Path, fmt: str, level: int) -> int:
    """Size of ``path`` under one ``fmt`` layer, computed without writing it."""
    counter = _Counter()
    _write_layer(path, cast(BinaryIO, counter), fmt, level)  # the writers only call write()
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
    zstd_zip_size = _layer_size(src_zip, "zstd", level)
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

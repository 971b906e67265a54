"""Reading a package's archive into a :class:`~cachesvc.unpack.tree.Tree`: layers
peeled by :mod:`cachesvc.unpack.codec`, a tar by ``tarfile`` in stream mode, a
zip by :mod:`cachesvc.unpack.extract_zip` (a package still arriving is read
as it grows). Paths and limits are the tree's.

* Refuses what a code package has no use for: every link (symlink or
  hardlink: checking targets against earlier links is a classic escape),
  devices, fifos, sparse and unknown tar members, encrypted zip members.
* Only contract errors: the parsers' own errors are ``UnsupportedFormat``,
  ``MemoryError`` is ``TooLarge``; a fault of this host (EIO, a read-only code
  dir) stays a 500.
* Bounded per header: tar PAX and long-name records over :data:`TAR_META_MAX`
  are refused before they are read; a bad checksum mid-archive is refused
  (``tarfile`` would take it for the end). Time is not bounded here
  (CVE-2024-6232): the worker's wall-clock budget does that.

Blocking, and meant for the unpack worker process.
"""

from __future__ import annotations

import contextlib
import errno
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

from cachesvc.errors import CachesvcError, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack import codec
from cachesvc.unpack.codec import KiB, Limits, MiB
from cachesvc.unpack.extract_zip import extract_arriving, extract_zip
from cachesvc.unpack.tree import NO_SPACE_ERRNOS, Tree, show

TAR_META_MAX = 64 * KiB
"""Largest PAX or GNU long-name record read (Linux paths are at most 4 KiB)."""


# What the parsers raise on corrupt input. OSError: decoders inside zipfile
# (bz2 "Invalid data stream" has no errno) and seeks to offsets a header made up.
_CORRUPT = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    EOFError,
    ValueError,
    OverflowError,
    RuntimeError,  # its "not implemented" subclass: zipfile's unknown methods, encryption
)
_CORRUPT_ERRNOS = {None, errno.EINVAL, errno.EOVERFLOW}


class Extracted(NamedTuple):
    """What an extraction wrote: regular files, their bytes, the package's layers."""

    files: int
    bytes: int
    layers: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Extracted | None:
        """The counts and layers a worker's answer or a manifest records, if
        well formed (counts >= 0, at least one known layer); else None."""
        files, size, layers = data.get("files"), data.get("bytes"), data.get("layers")
        if not (isinstance(files, int) and isinstance(size, int) and files >= 0 and size >= 0):
            return None
        if not isinstance(layers, list) or not layers:
            return None
        known = set(codec.COMPRESSIONS) | set(codec.ARCHIVES)
        if not all(isinstance(layer, str) and layer in known for layer in layers):
            return None
        return cls(files, size, tuple(layers))


def extract(package_path: codec.Package, dest: Path, limits: Limits) -> Extracted:
    """Extract the package (a path, or an open file) into the existing empty ``dest``.

    Raises only :class:`CachesvcError` subclasses (see the module docstring);
    on error ``dest`` holds partial output that the caller removes. A zip
    inside compression layers is spooled to an unlinked temp file in
    ``dest`` itself (so even a crash leaves nothing outside ``dest``).
    """
    kind = "package"
    with _refusing(lambda: kind):
        if isinstance(package_path, io.RawIOBase):  # still arriving: start now
            with codec.open_stream(package_path, limits) as archive:
                kind = archive.kind
                if archive.kind == "zip":
                    tree = extract_arriving(package_path, archive, dest, limits)
                else:
                    tree = Tree(dest, limits, archive.packed_size)
                    _extract_tar(archive.stream, tree, limits)
                return Extracted(tree.files, tree.bytes, archive.layers)
        with codec.open_archive(package_path, limits, spool_dir=dest) as archive:
            kind = archive.kind
            tree = Tree(dest, limits, archive.packed_size)
            _READERS[archive.kind](archive.stream, tree, limits)
            return Extracted(tree.files, tree.bytes, archive.layers)


@contextlib.contextmanager
def _refusing(kind: Callable[[], str]) -> Iterator[None]:
    """Map whatever reading the archive raised to the contract error it means."""
    try:
        yield
    except CachesvcError:
        raise
    except MemoryError as exc:
        raise TooLarge(f"reading the {kind()} needs more memory than an unpack may use") from exc
    except RecursionError as exc:
        raise UnsupportedFormat(f"corrupt {kind()}: headers nest too deep") from exc
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise TooLarge(f"spooling the {kind()}: {exc.strerror}") from exc
        if exc.errno not in _CORRUPT_ERRNOS:
            raise CachesvcError(f"reading the package: {exc}") from exc
        raise UnsupportedFormat(f"corrupt {kind()}: {_brief(exc)}") from exc
    except _CORRUPT as exc:
        raise UnsupportedFormat(f"corrupt {kind()}: {_brief(exc)}") from exc


def _brief(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---- tar ----

# tarfile's own HeaderError subclasses (module-level since Python 3.2; not in typeshed).
_BAD_HEADERS: tuple[type[Exception], ...] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
)
_TAR_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _StrictTarInfo(tarfile.TarInfo):
    """``tarfile``'s header reader, with our refusals applied before it reads on.

    ``_proc_member`` is the hook tarfile's source invites subclasses to
    override; the sparse hooks are replaced so a sparse map is never read.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _StrictTarInfo:
        # tarfile ends the archive quietly at a bad header after the first one;
        # raising a non-HeaderError here makes it a refusal instead.
        try:
            return super().frombuf(buf, encoding, errors)
        except _BAD_HEADERS as exc:
            raise UnsupportedFormat(f"corrupt tar header: {exc}") from exc

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_META_TYPES and not 0 <= self.size <= TAR_META_MAX:
            raise UnsupportedFormat(f"tar metadata record of {self.size} bytes")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsupportedFormat(f"sparse tar member: {show(self.name)}")
        return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]

    def _refuse_sparse(self, *_args: object) -> None:
        raise UnsupportedFormat("sparse tar member (PAX GNU.sparse)")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def _extract_tar(stream: BinaryIO, tree: Tree, _limits: Limits) -> None:
    """Read the tar forward (``tarfile`` mode ``r|``) straight into the tree.

    tarfile reads 10 KiB at a time; the buffer turns that into 1 MiB reads of
    the codec's stream (whose small reads cost a copy of its chunk: 3x slower).
    """
    buffered = io.BufferedReader(stream, buffer_size=MiB)  # type: ignore[type-var]
    with tarfile.open(
        fileobj=buffered,
        mode="r|",
        tarinfo=_StrictTarInfo,
        encoding="utf-8",
        errors="surrogateescape",
    ) as archive:
        while (member := archive.next()) is not None:
            archive.members.clear()  # type: ignore[attr-defined]  # else it keeps every header
            _tar_member(archive, tree, member)


def _tar_member(archive: tarfile.TarFile, tree: Tree, member: tarfile.TarInfo) -> None:
    name = member.name
    if member.issparse():
        raise UnsupportedFormat(f"sparse tar member: {show(name)}")
    if member.size < 0:
        raise UnsupportedFormat(f"tar member with a negative size: {show(name)}")
    if member.isreg():
        source = archive.extractfile(member)
        assert source is not None  # a regular member always has one
        tree.add_file(name, source, member.mode, member.mtime)
    elif member.isdir():
        tree.add_dir(name)
    elif member.islnk() or member.issym():
        raise UnsafeArchive(f"link in archive: {show(name)}")
    elif member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchive(f"device, fifo or special entry in archive: {show(name)}")
    else:
        raise UnsupportedFormat(f"tar entry type {member.type!r} for {show(name)}")


_READERS: dict[str, Callable[[BinaryIO, Tree, Limits], None]] = {
    "zip": extract_zip,
    "tar": _extract_tar,
}

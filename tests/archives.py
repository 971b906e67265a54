"""Real archives and compressed layers for the tests, built with the standard
library and the real compressors: tars and zips of a small code tree, the
compressors by layer name, and a package file named by its digest as the
store holds it. What a test reads back from an extracted tree is here too
(``tree_of``, ``expected_modes``), so building and checking agree.

Hostile archives live in ``tests/hostile.py``."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import lz4.frame
import zstandard

from cachesvc.digest import Digest

MTIME = time.mktime((2021, 6, 1, 12, 30, 0, 0, 0, -1))

# name -> (content, mode): a small code tree with the modes extraction must map
FILES: dict[str, tuple[bytes, int]] = {
    "handler.py": (b"import lib.util\ndef handler(e, c):\n    return 1\n" * 40, 0o644),
    "bin/run.sh": (b"#!/bin/sh\necho hi\n", 0o4755),  # setuid must be dropped
    "lib/__init__.py": (b"", 0o644),
    "lib/util.py": (os.urandom(300_000), 0o600),
    "lib/deep/er/data.json": (b'{"k": [1, 2, 3]}' * 1000, 0o666),
}

# layer name -> the real compressor of that layer
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda data: zstandard.ZstdCompressor(level=3).compress(data),
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ),
    "bzip2": bz2.compress,
    "lz4": lz4.frame.compress,
}


def wrap(data: bytes, layers: list[str]) -> bytes:
    """Apply compression ``layers`` (outermost first) around ``data``."""
    for layer in reversed(layers):
        data = COMPRESS[layer](data)
    return data


def tar_member(
    name: str, data: bytes = b"", mode: int = 0o644, **fields: object
) -> tuple[tarfile.TarInfo, bytes]:
    """A member for ``tar_bytes``: a regular file unless ``fields`` say otherwise."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(MTIME)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A PAX tar of ``members`` in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def tar_of(files: dict[str, tuple[bytes, int]] = FILES) -> bytes:
    return tar_bytes([tar_member(name, data, mode) for name, (data, mode) in files.items()])


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``files``, every member compressed by ``method``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


SOURCE = {f"pkg/mod{i}.py": f"def f{i}(x):\n    return x * {i}\n".encode() * 40 for i in range(200)}


def python_like_zip(path: Path) -> Path:
    """Many small similar members, deflated one by one: where tar.zst wins."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pkg/", b"")
        for name, data in SOURCE.items():
            archive.writestr(name, data)
        script = zipfile.ZipInfo("bin/tool", date_time=(2022, 3, 4, 5, 6, 8))
        script.external_attr = (stat.S_IFREG | 0o755) << 16
        archive.writestr(script, b"#!/bin/sh\nexit 0\n")
    return path


def stored_package(tmp_path: Path, data: bytes) -> tuple[Digest, Path]:
    """Write a package as the store would hold it: named by its digest."""
    digest = Digest.parse(hashlib.sha256(data).hexdigest())
    path = tmp_path / "store" / digest.hex
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return digest, path


def tree_of(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under root: relative name -> (content, permission bits)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            found[str(path.relative_to(root))] = (
                path.read_bytes(),
                stat.S_IMODE(path.stat().st_mode),
            )
    return found


def expected_modes(files: dict[str, tuple[bytes, int]]) -> dict[str, tuple[bytes, int]]:
    """The tree extraction leaves of ``files``: executables 0755, the rest 0644."""
    return {name: (data, 0o755 if mode & 0o111 else 0o644) for name, (data, mode) in files.items()}


def tree_with_times(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``root``: its bytes, mode and whole-second mtime."""
    return {
        str(p.relative_to(root)): (
            p.read_bytes(),
            stat.S_IMODE(p.stat().st_mode),
            int(p.stat().st_mtime),
        )
        for p in root.rglob("*")
        if p.is_file()
    }

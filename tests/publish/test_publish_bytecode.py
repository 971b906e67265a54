"""``publish --bytecode``: pycs made by the named interpreter, shipped inside the package.
Real interpreters, real archives, the real ``cachesvc`` command over a file origin."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from cachesvc.errors import UnsupportedFormat
from cachesvc.publish.bytecode import add_bytecode
from cachesvc.unpack.bytecode import Runtime
from tests.archives import SOURCE, python_like_zip
from tests.processes import publish_cli

SOURCES = {
    "handler.py": b"import lib.mod\n\ndef handler(event, context):\n    return lib.mod.f()\n",
    "lib/__init__.py": b"",
    "lib/mod.py": b"def f():\n    return 42\n",
    "lib/broken.py": b"def broken(:\n",
    "lib/data.json": b'{"a": 1}',
}


def runtime() -> Runtime:
    return asyncio.run(Runtime.probe("python3.11", Path(sys.executable)))


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def check_pycs(found: dict[str, bytes], rt: Runtime, sources: list[str]) -> None:
    pycs = {name: data for name, data in found.items() if name.endswith(".pyc")}
    assert set(pycs) == {rt.pyc_of(rel) for rel in sources}
    for rel in sources:
        pyc = pycs[rt.pyc_of(rel)]
        assert pyc[:4] == rt.magic and pyc[4:8] == b"\x01\x00\x00\x00"  # unchecked hash
        assert pyc[8:16] == importlib.util.source_hash(SOURCES[rel])


@pytest.mark.slow  # a cachesvc process
def test_publish_bytecode_ships_unchecked_hash_pycs_in_the_package(tmp_path: Path) -> None:
    package = write_zip(tmp_path / "fn.zip", SOURCES)
    done = publish_cli(tmp_path, package, "--bytecode", sys.executable)
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip()
    blob = (tmp_path / "origin" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    assert digest == "sha256:" + hashlib.sha256(blob).hexdigest()  # the digest covers the pycs
    found = members(blob)
    assert {k: v for k, v in found.items() if not k.endswith(".pyc")} == SOURCES
    check_pycs(found, runtime(), ["handler.py", "lib/__init__.py", "lib/mod.py"])
    assert "3 modules compiled, 1 skipped (lib/broken.py: SyntaxError" in done.stderr
    assert "MiB unpacked" in done.stderr


def test_bytecode_is_appended_to_a_tar_and_the_members_kept(tmp_path: Path) -> None:
    src = tmp_path / "fn.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in SOURCES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rt = runtime()
    report = add_bytecode(src, tmp_path / "out.tar", [rt])
    assert report.kept and (report.compiled, report.skipped) == (3, 1)
    with tarfile.open(tmp_path / "out.tar") as tf:
        found = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
    assert {k: v for k, v in found.items() if not k.endswith(".pyc")} == SOURCES
    check_pycs(found, rt, ["handler.py", "lib/__init__.py", "lib/mod.py"])


def test_a_package_without_sources_is_published_unchanged(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "data.zip", {"model.bin": b"\x00" * 100})
    report = add_bytecode(src, tmp_path / "out.zip", [runtime()])
    assert not report.kept and not (tmp_path / "out.zip").exists()
    assert "package unchanged" in report.describe()


def test_a_layered_package_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "fn.zip.zst"
    src.write_bytes(
        zstandard.ZstdCompressor().compress(write_zip(tmp_path / "fn.zip", SOURCES).read_bytes())
    )
    with pytest.raises(UnsupportedFormat, match="plain zip or tar, not zstd,zip"):
        add_bytecode(src, tmp_path / "out", [runtime()])


@pytest.mark.slow  # a cachesvc process
def test_publish_refuses_an_interpreter_that_is_not_there(tmp_path: Path) -> None:
    package = write_zip(tmp_path / "fn.zip", SOURCES)
    done = publish_cli(tmp_path, package, "--bytecode", "no-such-python3.11")
    assert done.returncode == 1
    assert "--bytecode no-such-python3.11: no such interpreter" in done.stderr


@pytest.mark.slow  # a cachesvc process
def test_bytecode_then_repack_ships_the_pycs_in_the_tar_zst(tmp_path: Path) -> None:
    package = python_like_zip(tmp_path / "fn.zip")
    done = publish_cli(tmp_path, package, "--bytecode", sys.executable, "--repack")
    assert done.returncode == 0, done.stderr
    assert "using tar.zst" in done.stderr
    blob = tmp_path / "origin" / "blobs" / "sha256" / done.stdout.strip().removeprefix("sha256:")
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        names = set(tf.getnames())
    rt = runtime()
    sources = [name for name in SOURCE if name.endswith(".py")]
    assert sources and {rt.pyc_of(rel) for rel in sources} <= names
    assert set(SOURCE) <= names

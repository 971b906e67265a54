"""Safe, atomic, coalesced extraction: real archives, real compressors, hostile packages."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import re
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import pytest
import zstandard

from cachesvc.digest import Digest
from cachesvc.errors import TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import extract
from cachesvc.unpack.unpacker import Unpacker
from tests import hostile
from tests.archives import (
    FILES,
    MTIME,
    expected_modes,
    stored_package,
    tar_bytes,
    tar_member,
    tar_of,
    tree_of,
    wrap,
)
from tests.codedir_mayhem import fake_hex, manifest_for, planted, snapshot

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

MiB = 1024 * 1024


def zip_bytes(files: dict[str, tuple[bytes, int]] = FILES) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zip_member("lib/", 0o755 | stat.S_IFDIR), b"")
        for name, (data, mode) in files.items():
            archive.writestr(zip_member(name, mode | stat.S_IFREG), data)
    return buf.getvalue()


def zip_member(name: str, unix_mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=time.localtime(MTIME)[:6])
    info.create_system = 3
    info.external_attr = unix_mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    return tmp_path / "code"


@pytest.fixture
async def unpacker(code_dir: Path) -> AsyncIterator[Unpacker]:
    async with Unpacker(code_dir) as running:
        yield running


async def unpack_with(limits: Limits, code_dir: Path, digest: Digest, package: Path) -> object:
    async with Unpacker(code_dir, limits) as unpacker:
        return await unpacker.unpack(digest, package)


ROUND_TRIPS = [
    ["zip"],
    ["tar"],
    ["zstd", "zip"],
    ["zstd", "tar"],
    ["xz", "gzip", "tar"],
    ["gzip", "zstd", "tar"],
    ["lz4", "tar"],
    ["bzip2", "zip"],
    ["gzip", "zip"],
    ["lz4", "zip"],
    ["xz", "zip"],
    ["bzip2", "tar"],
]


@pytest.mark.parametrize("layers", ROUND_TRIPS, ids=",".join)
async def test_every_layer_combination_unpacks_byte_exact(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path, layers: list[str]
) -> None:
    inner = zip_bytes() if layers[-1] == "zip" else tar_of()
    digest, package = stored_package(tmp_path, wrap(inner, layers[:-1]))

    result = await unpacker.unpack(digest, package)

    assert result.path == code_dir / digest.hex
    assert tree_of(result.path) == expected_modes(FILES)
    assert (result.files, result.bytes) == (len(FILES), sum(len(d) for d, _ in FILES.values()))
    assert result.as_json() == {
        "digest": str(digest),
        "path": str(code_dir / digest.hex),
        "files": len(FILES),
        "bytes": result.bytes,
        "layers": layers,
    }
    assert (result.path / "handler.py").stat().st_mtime == pytest.approx(MTIME, abs=2)
    assert sorted(p.name for p in code_dir.iterdir()) == [digest.hex, digest.hex + ".json"]


async def test_a_second_call_answers_from_the_manifest_without_the_package(
    tmp_path: Path, unpacker: Unpacker
) -> None:
    digest, package = stored_package(tmp_path, zip_bytes())
    first = await unpacker.unpack(digest, package)
    package.unlink()
    assert await unpacker.unpack(digest, package) == first
    async with Unpacker(unpacker.code_dir) as fresh:
        assert await fresh.unpack(digest, package) == first


async def test_concurrent_unpacks_of_one_digest_share_one_extraction(
    tmp_path: Path, unpacker: Unpacker
) -> None:
    digest, package = stored_package(tmp_path, wrap(tar_of(), ["zstd"]))

    results = await asyncio.gather(*(unpacker.unpack(digest, package) for _ in range(20)))

    assert unpacker.workers.started == 1
    assert len(set(results)) == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_extraction(
    tmp_path: Path, unpacker: Unpacker
) -> None:
    digest, package = stored_package(tmp_path, wrap(zip_bytes(), ["xz"]))
    impatient = asyncio.ensure_future(unpacker.unpack(digest, package))
    patient = asyncio.ensure_future(unpacker.unpack(digest, package))
    await asyncio.sleep(0)
    impatient.cancel()
    result = await patient
    assert tree_of(result.path) == expected_modes(FILES)


async def test_remove_deletes_tree_and_manifest_and_allows_a_fresh_unpack(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, tar_of())
    await unpacker.unpack(digest, package)
    await unpacker.remove(digest)
    assert list(code_dir.iterdir()) == []
    await unpacker.remove(digest)  # absent: no error
    result = await unpacker.unpack(digest, package)
    assert tree_of(result.path) == expected_modes(FILES)


async def test_sweep_removes_leftovers_of_a_crash_and_keeps_finished_trees(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, zip_bytes())
    await unpacker.unpack(digest, package)
    (code_dir / ".tmp-0123-crashed" / "lib").mkdir(parents=True)
    (code_dir / ".tmp-manifest.json").write_text("{")
    (code_dir / ("ab" * 32 + ".json")).write_text("{}")  # manifest whose tree never landed

    assert unpacker.sweep_temp() == 3
    assert sorted(p.name for p in code_dir.iterdir()) == [digest.hex, digest.hex + ".json"]


@pytest.mark.slow
async def test_sweep_removes_every_kind_of_leftover_never_follows_a_link_and_never_raises(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, tar_of())
    await unpacker.unpack(digest, package)
    with planted(code_dir, tmp_path / "outside") as mayhem:
        outside = snapshot(tmp_path / "outside")
        unreadable = mayhem.tree(code_dir, "manifest read fails", manifest_for(fake_hex("x")))
        (code_dir / f"{unreadable}.json").write_text(manifest_for(unreadable))  # valid, if read
        real_open = os.open

        def eacces_for_one_manifest(
            path: StrOrBytesPath, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
        ) -> int:
            if str(path).endswith(f"{unreadable}.json"):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, mode, dir_fd=dir_fd)

        with mock.patch("os.open", eacces_for_one_manifest):
            removed = unpacker.sweep_temp()

        assert set(os.listdir(code_dir)) == {digest.hex, f"{digest.hex}.json"} | mayhem.kept
        assert removed == len(mayhem.doomed)
        assert snapshot(tmp_path / "outside") == outside
        assert tree_of(code_dir / digest.hex) == expected_modes(FILES)


def test_sweep_of_a_code_dir_it_cannot_list_logs_and_answers_zero(
    code_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unpacker = Unpacker(code_dir)
    with mock.patch("os.scandir", side_effect=OSError(errno.EIO, "Input/output error")):
        assert unpacker.sweep_temp() == 0
    assert "cannot list the code dir" in caplog.text


async def test_a_tree_without_its_manifest_is_extracted_again(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, tar_of())
    first = await unpacker.unpack(digest, package)
    (code_dir / (digest.hex + ".json")).unlink()
    (first.path / "handler.py").write_bytes(b"damaged")
    again = await unpacker.unpack(digest, package)
    assert again == first
    assert tree_of(again.path) == expected_modes(FILES)


@pytest.mark.parametrize(
    "damage",
    [{"layers": [["tar"]]}, {"layers": []}, {"files": -1}, {"layers": ["rar"]}],
    ids=["unhashable-layer", "no-layers", "negative-count", "unknown-layer"],
)
async def test_a_manifest_that_lies_is_not_trusted_and_the_tree_is_made_again(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path, damage: dict[str, object]
) -> None:
    digest, package = stored_package(tmp_path, tar_of())
    first = await unpacker.unpack(digest, package)
    manifest = code_dir / (digest.hex + ".json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **damage}))
    (first.path / "handler.py").write_bytes(b"damaged")
    again = await unpacker.unpack(digest, package)
    assert again == first
    assert tree_of(again.path) == expected_modes(FILES)


LONG_NAME = "d" * 60 + "/" + "e" * 60 + "/" + "f" * 90 + ".py"  # ustar splits it into prefix/name


@pytest.mark.parametrize(
    "fmt",
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
    ids=["ustar", "gnu", "pax"],
)
async def test_tar_formats_with_long_and_unicode_names_unpack_byte_exact(
    tmp_path: Path, unpacker: Unpacker, fmt: int
) -> None:
    files = {LONG_NAME: (b"x" * 1000, 0o755), "ünï/cødé.txt": (b"u", 0o644), "e": (b"", 0o644)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for name, (data, mode) in files.items():
            info, _ = tar_member(name, data, mode)
            archive.addfile(info, io.BytesIO(data))
    digest, package = stored_package(tmp_path, wrap(buf.getvalue(), ["zstd"]))
    result = await unpacker.unpack(digest, package)
    assert tree_of(result.path) == expected_modes(files)


# ---- hostile packages: refused with the right error, nothing left behind ----


def zip_with(name: str, data: bytes = b"x", unix_mode: int = 0o644 | stat.S_IFREG) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("ok.txt", b"fine")
        archive.writestr(zip_member(name, unix_mode), data)
    return buf.getvalue()


def deflate_zero_bomb(gib: int) -> bytes:
    """A valid one-member zip of ``gib`` GiB of zeros (~1 MiB), built without deflating GiBs.

    A full-flushed deflate block of 1 MiB of zeros is self-contained, so it
    repeats; an empty final block ends the stream.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    data = block * (gib * 1024) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    size, crc, name = gib << 30, 0, b"zeros.bin"
    for _ in range(gib * 1024):
        crc = zlib.crc32(bytes(MiB), crc)
    fields = (20, 0, 8, 0, 0x21, crc, len(data), size, len(name))
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", *fields, 0) + name
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, 0)
    central += name
    end = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0
    )
    return local + data + central + end


def many_empty_files_zip(count: int) -> bytes:
    """A stored zip of ``count`` empty files, packed by hand (zipfile needs seconds)."""
    locals_, centrals, offset = [], [], 0
    for i in range(count):
        name = f"f/{i}".encode()
        fields = (20, 0, 0, 0, 0x21, 0, 0, 0, len(name))
        local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", *fields, 0) + name
        centrals.append(
            struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, offset)
            + name
        )
        locals_.append(local)
        offset += len(local)
    central = b"".join(centrals)
    entries = min(count, 0xFFFF)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, entries, entries, len(central), offset, 0)
    return b"".join(locals_) + central + end


def zstd_zero_bomb_tar(gib: int) -> bytes:
    """tar.zst of ``gib`` GiB of zeros: a header frame, then one small frame repeated."""
    compressor = zstandard.ZstdCompressor(level=1)
    info, _ = tar_member("zeros.bin")
    info.size = gib << 30
    frame = compressor.compress(bytes(4 * MiB))
    return compressor.compress(info.tobuf(format=tarfile.PAX_FORMAT)) + frame * (gib * 256)


def tar_with_type(kind: bytes) -> bytes:
    return hostile.member("odd", b"", type=kind) + hostile.END


# case -> (package, error, the rule its detail must name)
HOSTILE: dict[str, tuple[bytes, type[Exception], str]] = {
    "zip slip": (zip_with("../../evil.txt"), UnsafeArchive, "member path with '..'"),
    "zip absolute path": (zip_with("/tmp/evil.txt"), UnsafeArchive, "absolute"),
    "zip 2000 levels deep": (zip_with("d/" * 2000 + "f"), UnsupportedFormat, "levels deep"),
    "zip member without a name": (zip_with(""), UnsafeArchive, "without a name"),
    "zip symlink": (
        zip_with("link", b"/etc/passwd", 0o777 | stat.S_IFLNK),
        UnsafeArchive,
        "link in archive",
    ),
    "zip fifo": (zip_with("pipe", b"", 0o644 | stat.S_IFIFO), UnsafeArchive, "fifo"),
    "tar dotdot": (
        tar_bytes([tar_member("a/../../evil.txt", b"x")]),
        UnsafeArchive,
        "member path with '..'",
    ),
    "tar absolute path": (
        tar_bytes([tar_member("/etc/evil.txt", b"x")]),
        UnsafeArchive,
        "absolute",
    ),
    "tar symlink escape": (
        tar_bytes(
            [tar_member("up", type=tarfile.SYMTYPE, linkname="../.."), tar_member("up/evil")]
        ),
        UnsafeArchive,
        "link in archive",
    ),
    "tar hardlink escape": (
        tar_bytes([tar_member("passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd")]),
        UnsafeArchive,
        "link in archive",
    ),
    "tar char device": (
        tar_bytes([tar_member("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)]),
        UnsafeArchive,
        "device",
    ),
    "tar fifo": (tar_bytes([tar_member("pipe", type=tarfile.FIFOTYPE)]), UnsafeArchive, "fifo"),
    "tar duplicate file": (
        tar_bytes([tar_member("a", b"1"), tar_member("a", b"2")]),
        UnsafeArchive,
        "conflicting",
    ),
    "tar file then dir": (
        tar_bytes([tar_member("a", b"1"), tar_member("a/b", b"2")]),
        UnsafeArchive,
        "conflicting",
    ),
    "not an archive": (b"#!/bin/sh\nrm -rf /\n" * 100, UnsupportedFormat, "not zip, tar"),
    "zstd around text": (wrap(b"hello\n" * 1000, ["zstd"]), UnsupportedFormat, "not zip, tar"),
    "truncated zip": (zip_bytes()[:-30], UnsupportedFormat, "zip"),
    "truncated tar": (tar_of()[:1500], UnsupportedFormat, "corrupt tar"),
    "tar sparse member": (
        tar_bytes([tar_member("holes", type=tarfile.GNUTYPE_SPARSE)]),
        UnsupportedFormat,
        "sparse",
    ),
    "tar PAX sparse map": (
        hostile.pax(
            hostile.record("GNU.sparse.major", "1") + hostile.record("GNU.sparse.minor", "0")
        )
        + hostile.member("holes", b"3\n" + b"1\n" * 5000)
        + hostile.END,
        UnsupportedFormat,
        "sparse",
    ),
    "tar PAX record of length 0": (hostile.pax_length_zero(), UnsupportedFormat, "corrupt tar"),
    "tar PAX size -1": (hostile.pax_size_minus_one(), UnsupportedFormat, "negative size"),
    "tar PAX size beyond the archive": (
        hostile.pax(hostile.record("size", str(10**30))) + hostile.member() + hostile.END,
        UnsupportedFormat,
        "corrupt tar",
    ),
    "tar PAX record over 64 KiB": (
        hostile.pax(hostile.record("comment", "x" * 70_000)) + hostile.member() + hostile.END,
        UnsupportedFormat,
        "metadata record",
    ),
    "tar GNU long name over 64 KiB": (
        hostile.member("././@LongLink", b"n" * 70_000, type=tarfile.GNUTYPE_LONGNAME)
        + hostile.member()
        + hostile.END,
        UnsupportedFormat,
        "metadata record",
    ),
    "tar chain of 2000 PAX headers": (
        hostile.pax(hostile.record("comment", "x")) * 2000 + hostile.member() + hostile.END,
        UnsupportedFormat,
        "nest too deep",
    ),
    "tar bad checksum after the first member": (
        hostile.member() + bytes(512 - 1) + b"x" + hostile.END,
        UnsupportedFormat,
        "corrupt tar header",
    ),
    "tar volume label": (tar_with_type(b"V"), UnsupportedFormat, "type"),
    "tar unknown type": (tar_with_type(b"Z"), UnsupportedFormat, "type"),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_package_is_refused_by_its_rule_and_leaves_nothing(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path, case: str
) -> None:
    data, error, rule = HOSTILE[case]
    digest, package = stored_package(tmp_path, wrap(data, ["gzip"]) if "tar" in case else data)
    with pytest.raises(error, match=re.escape(rule)):
        await unpacker.unpack(digest, package)
    assert list(code_dir.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


async def test_a_pax_mtime_of_1e400_unpacks_with_the_current_time(
    tmp_path: Path, unpacker: Unpacker
) -> None:
    digest, package = stored_package(tmp_path, hostile.pax_mtime_overflow())
    result = await unpacker.unpack(digest, package)
    assert (result.path / "a.txt").read_bytes() == b"hello"
    assert abs((result.path / "a.txt").stat().st_mtime - time.time()) < 3600


@pytest.mark.slow
async def test_zip_bomb_of_a_gib_of_zeros_is_too_large(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, deflate_zero_bomb(gib=1))
    with pytest.raises(TooLarge, match="200x"):
        await unpacker.unpack(digest, package)
    assert list(code_dir.iterdir()) == []


@pytest.mark.slow
async def test_tar_zst_bomb_of_gibs_of_zeros_is_too_large(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, zstd_zero_bomb_tar(gib=16))
    assert package.stat().st_size < MiB
    with pytest.raises(TooLarge):
        await unpacker.unpack(digest, package)
    assert list(code_dir.iterdir()) == []


@pytest.mark.slow
async def test_a_hundred_thousand_empty_files_are_over_max_files(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, many_empty_files_zip(100_001))
    with pytest.raises(TooLarge, match="100000"):
        await unpacker.unpack(digest, package)
    assert list(code_dir.iterdir()) == []


async def test_a_tar_with_more_entries_than_max_files_is_refused_while_streaming(
    tmp_path: Path, code_dir: Path
) -> None:
    members = [tar_member(f"f/{i}") for i in range(501)]
    digest, package = stored_package(tmp_path, wrap(tar_bytes(members), ["zstd"]))
    with pytest.raises(TooLarge, match="500 entries"):
        await unpack_with(Limits(max_files=500), code_dir, digest, package)
    assert list(code_dir.iterdir()) == []


async def test_unpacked_size_is_counted_on_bytes_written(tmp_path: Path, code_dir: Path) -> None:
    files = {f"part{i}": (os.urandom(400_000), 0o644) for i in range(3)}
    limits = Limits(max_unpacked_size=MiB)
    for data in (zip_bytes(files), tar_of(files)):
        digest, package = stored_package(tmp_path, data)
        with pytest.raises(TooLarge, match="unpacks to over"):
            await unpack_with(limits, code_dir, digest, package)
        assert list(code_dir.iterdir()) == []


async def test_a_zip_that_understates_its_sizes_is_refused(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    data = bytearray(zip_bytes({"big": (bytes(2 * MiB), 0o644)}))
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 10)  # claimed uncompressed size
    digest, package = stored_package(tmp_path, bytes(data))
    with pytest.raises(UnsupportedFormat):
        await unpacker.unpack(digest, package)
    assert list(code_dir.iterdir()) == []


async def test_package_over_max_package_size_is_too_large(tmp_path: Path, code_dir: Path) -> None:
    digest, package = stored_package(tmp_path, zip_bytes())
    with pytest.raises(TooLarge):
        await unpack_with(Limits(max_package_size=1024), code_dir, digest, package)
    assert list(code_dir.iterdir()) == []


async def test_manifest_beside_the_tree_holds_the_result(
    tmp_path: Path, unpacker: Unpacker, code_dir: Path
) -> None:
    digest, package = stored_package(tmp_path, wrap(zip_bytes(), ["zstd"]))
    result = await unpacker.unpack(digest, package)
    manifest = json.loads((code_dir / f"{digest.hex}.json").read_text())
    assert manifest == result.as_json()
    assert not (result.path / ".cachesvc-unpack.json").exists()


def test_a_zip_member_with_an_unknown_compression_method_is_unsupported(tmp_path: Path) -> None:
    package = tmp_path / "odd.zip"
    with zipfile.ZipFile(package, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("handler.py", b"x = 1\n")
    raw = bytearray(package.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local, central
        at = raw.find(signature)
        raw[at + offset : at + offset + 2] = (99).to_bytes(2, "little")  # AES: not supported
    package.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFormat):
        extract(package, tmp_path / "out", Limits())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

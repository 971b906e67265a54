"""Layer detection and the bounded decoder stack, on real archives and real compressors."""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import zstandard

from cachesvc.errors import TooLarge, UnsupportedFormat
from cachesvc.unpack import codec
from cachesvc.unpack.codec import Limits
from tests.archives import COMPRESS, wrap

MiB = 1024 * 1024

FILES = {
    "handler.py": b"def handler(event, context):\n    return {'ok': True}\n" * 50,
    "lib/util.py": bytes(range(256)) * 300,
    "lib/empty.txt": b"",
}


def archive_bytes(kind: str, files: dict[str, bytes] = FILES) -> bytes:
    """A real zip (deflated) or tar (PAX) holding ``files``."""
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_package(tmp_path: Path, layers: list[str], name: str = "package.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(wrap(archive_bytes(layers[-1]), layers[:-1]))
    return path


LAYER_COMBINATIONS = [
    ["zip"],
    ["tar"],
    ["zstd", "zip"],
    ["zstd", "tar"],
    ["gzip", "tar"],
    ["xz", "tar"],
    ["bzip2", "zip"],
    ["lz4", "tar"],
    ["lz4", "zip"],
    ["xz", "gzip", "tar"],
    ["gzip", "zstd", "tar"],
    ["zstd", "gzip", "tar"],
    ["zstd", "xz", "bzip2", "lz4", "zip"],
]


@pytest.mark.parametrize("layers", LAYER_COMBINATIONS, ids=",".join)
def test_layers_are_detected_and_peeled_byte_exact(tmp_path: Path, layers: list[str]) -> None:
    inner = archive_bytes(layers[-1])
    path = tmp_path / "package.bin"
    path.write_bytes(wrap(inner, layers[:-1]))

    assert codec.detect_layers(path) == layers
    with codec.open_stream(path) as archive:
        assert list(archive.layers) == layers
        assert archive.stream.read() == inner


def test_detection_ignores_the_file_name(tmp_path: Path) -> None:
    path = write_package(tmp_path, ["gzip", "tar"], name="function.zip")
    assert codec.detect_layers(path) == ["gzip", "tar"]


def test_old_v7_tar_without_magic_is_detected_by_its_checksum(tmp_path: Path) -> None:
    header = bytearray(archive_bytes("tar", {"a.txt": b"x"})[:512])
    header[257:265] = bytes(8)  # erase "ustar\x0000"
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\x00".encode()
    path = tmp_path / "v7.tar"
    path.write_bytes(bytes(header) + b"x" + bytes(511 + 1024))
    assert codec.detect_layers(path) == ["tar"]


def test_unknown_format_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    path.write_bytes(b"just some text, not an archive\n" * 40)
    with pytest.raises(UnsupportedFormat):
        codec.detect_layers(path)


def test_unknown_format_inside_compression_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "pkg.zst"
    path.write_bytes(wrap(b"plain text inside zstd\n" * 100, ["zstd"]))
    with pytest.raises(UnsupportedFormat, match="inside zstd"):
        codec.detect_layers(path)


def test_more_layers_than_max_depth_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "deep.bin"
    path.write_bytes(wrap(archive_bytes("tar"), ["gzip"] * 3))
    assert codec.detect_layers(path, Limits(max_depth=3)) == ["gzip"] * 3 + ["tar"]
    with pytest.raises(UnsupportedFormat, match="more than 2"):
        codec.detect_layers(path, Limits(max_depth=2))


def test_package_over_max_package_size_is_too_large(tmp_path: Path) -> None:
    path = write_package(tmp_path, ["tar"])
    with pytest.raises(TooLarge):
        codec.detect_layers(path, Limits(max_package_size=1000))


def test_corrupt_compressed_data_is_unsupported(tmp_path: Path) -> None:
    data = bytearray(wrap(bytes(range(256)) * 4000, ["gzip"]))
    data[40:60] = b"\xff" * 20
    path = tmp_path / "corrupt.gz"
    path.write_bytes(data)
    with pytest.raises(UnsupportedFormat, match="corrupt gzip"):
        codec.detect_layers(path)


def test_concatenated_gzip_members_and_zstd_frames_decode_whole(tmp_path: Path) -> None:
    inner = archive_bytes("tar")
    half = len(inner) // 2
    for layer in ("gzip", "zstd", "lz4"):
        path = tmp_path / f"multi.{layer}"
        path.write_bytes(COMPRESS[layer](inner[:half]) + COMPRESS[layer](inner[half:]))
        with codec.open_stream(path) as archive:
            assert archive.stream.read() == inner


def zstd_zero_bomb(path: Path, gib: int) -> None:
    """A tar.zst whose one member claims ``gib`` GiB of zeros, written in ~100 KiB.

    One zstd frame holds the tar header; then the same small frame of 4 MiB
    of zeros repeats (multi-frame zstd), so nothing big is ever built.
    """
    header = tarfile.TarInfo("zeros.bin")
    header.size = gib << 30
    compressor = zstandard.ZstdCompressor(level=1)
    zeros_frame = compressor.compress(bytes(4 * MiB))
    with open(path, "wb") as out:
        out.write(compressor.compress(header.tobuf(format=tarfile.PAX_FORMAT)))
        for _ in range((gib << 30) // (4 * MiB)):
            out.write(zeros_frame)


def test_zstd_bomb_stops_at_the_ratio_bound(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.zst"
    zstd_zero_bomb(path, gib=8)
    limits = Limits(max_unpacked_size=16 << 30)
    # nine digits: it stopped within the first GB of the 8 GiB it claims
    with (
        codec.open_stream(path, limits) as archive,
        pytest.raises(TooLarge, match=r"expands over 200x \(\d{9} bytes"),
    ):
        while archive.stream.read(MiB):
            pass


def test_closing_a_stream_early_stops_its_read_ahead_thread(tmp_path: Path) -> None:
    path = tmp_path / "big.tar.zst"
    path.write_bytes(wrap(archive_bytes("tar", {"big": bytes(64 * MiB)}), ["zstd"]))
    before = threading.active_count()
    with codec.open_stream(path) as archive:
        assert archive.stream.read(1000)
        assert threading.active_count() == before + 1
    assert threading.active_count() == before


def test_decoded_output_over_the_unpacked_bound_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.tar.gz"
    path.write_bytes(wrap(archive_bytes("tar", {"big": bytes(8 * MiB)}), ["gzip"]))
    limits = Limits(max_unpacked_size=MiB, max_files=1)
    with codec.open_stream(path, limits) as archive, pytest.raises(TooLarge, match="decodes"):
        archive.stream.read()


def test_zip_inside_compression_is_spooled_to_an_unlinked_seekable_file(tmp_path: Path) -> None:
    path = write_package(tmp_path, ["zstd", "zip"])
    spool = tmp_path / "spool"
    spool.mkdir()
    with codec.open_archive(path, spool_dir=spool) as archive:
        assert archive.layers == ("zstd", "zip")
        assert list(spool.iterdir()) == []
        archive.stream.seek(0)
        with zipfile.ZipFile(archive.stream) as unzipped:
            assert unzipped.read("handler.py") == FILES["handler.py"]
    assert list(spool.iterdir()) == []


async def test_archive_stream_yields_layers_then_bounded_chunks(tmp_path: Path) -> None:
    inner = archive_bytes("tar", {"blob": bytes(range(256)) * 4096})
    path = tmp_path / "pkg"
    path.write_bytes(wrap(inner, ["xz", "gzip"]))
    async with codec.archive_stream(path, chunk_size=64 * 1024) as archive:
        assert archive.layers == ("xz", "gzip", "tar")
        chunks = [chunk async for chunk in archive]
    assert max(len(chunk) for chunk in chunks) <= 64 * 1024
    assert b"".join(chunks) == inner


async def test_archive_stream_refuses_unknown_format_before_yielding(tmp_path: Path) -> None:
    path = tmp_path / "pkg"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(UnsupportedFormat):
        async with codec.archive_stream(path):
            pytest.fail("must not yield")


def test_limits_reject_non_positive_bounds() -> None:
    with pytest.raises(ValueError):
        Limits(max_files=0)

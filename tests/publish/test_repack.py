"""Publisher transforms: compress adds a layer the codec reads back; repack zip -> tar.zst."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from cachesvc.errors import UnsafeArchive, UnsupportedFormat
from cachesvc.publish import repack
from cachesvc.unpack import codec
from cachesvc.unpack.extract import extract
from tests.archives import python_like_zip, tree_with_times


def unpacked(package: Path, dest: Path) -> dict[str, tuple[bytes, int, int]]:
    dest.mkdir()
    extract(package, dest, codec.Limits())
    return tree_with_times(dest)


@pytest.mark.parametrize("fmt", codec.COMPRESSIONS)
def test_compress_adds_one_layer_the_codec_peels_byte_exact(tmp_path: Path, fmt: str) -> None:
    src = python_like_zip(tmp_path / "fn.zip")
    dst = tmp_path / "fn.pkg"

    size = repack.compress(src, dst, fmt, level=1)

    assert size == dst.stat().st_size
    assert codec.detect_layers(dst) == [fmt, "zip"]
    with codec.open_stream(dst) as archive:
        assert archive.stream.read() == src.read_bytes()


def test_compress_refuses_an_unknown_format_and_writes_nothing(tmp_path: Path) -> None:
    src = python_like_zip(tmp_path / "fn.zip")
    with pytest.raises(UnsupportedFormat):
        repack.compress(src, tmp_path / "out", "brotli")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fn.zip"]


def test_repack_makes_a_smaller_tar_zst_with_the_same_files(tmp_path: Path) -> None:
    src = python_like_zip(tmp_path / "fn.zip")
    dst = tmp_path / "fn.tar.zst"

    report = repack.repack(src, dst, level=19)

    assert report.kept
    assert report.zip_size == src.stat().st_size
    assert report.tar_zstd_size == dst.stat().st_size < report.zip_size
    assert 0 < report.zstd_zip_size < report.zip_size
    assert report.best in ("zstd,tar", "zstd,zip")
    assert codec.detect_layers(dst) == ["zstd", "tar"]
    assert unpacked(dst, tmp_path / "a") == unpacked(src, tmp_path / "b")
    assert stat.S_IMODE((tmp_path / "a" / "bin" / "tool").stat().st_mode) == 0o755


def test_repack_keeps_nothing_when_tar_zst_is_not_smaller(tmp_path: Path) -> None:
    src = tmp_path / "random.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("noise.bin", os.urandom(200_000))
    dst = tmp_path / "random.tar.zst"

    report = repack.repack(src, dst, level=1)

    assert not report.kept
    assert report.tar_zstd_size >= report.zip_size
    assert report.best == "zip"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.zip"]


def test_repack_refuses_links_and_leaves_no_temp_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        link = zipfile.ZipInfo("node_modules/.bin/tool")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, b"../tool/cli.js")
    src = tmp_path / "links.zip"
    src.write_bytes(buf.getvalue())

    with pytest.raises(UnsafeArchive):
        repack.repack(src, tmp_path / "links.tar.zst", level=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links.zip"]

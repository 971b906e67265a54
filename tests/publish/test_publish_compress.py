"""``publish --compress``: a layer is kept only when it makes the package smaller,
random bytes are recognised by a fast pass, the level is the user's to choose.
Real compressors, real files, the real ``cachesvc`` command over a file origin."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from cachesvc.publish import repack
from cachesvc.unpack import codec
from tests.archives import python_like_zip
from tests.processes import publish_cli


def skewed(size: int, seed: int = 5) -> bytes:
    """Random over 200 of the 256 byte values: no repeats worth a match, only
    skew an entropy coder can use (gzip's Huffman does; zstd declines)."""
    rng = random.Random(seed)
    return bytes(rng.randrange(200) for _ in range(size))


def test_a_layer_that_makes_the_package_smaller_is_kept(tmp_path: Path) -> None:
    src = python_like_zip(tmp_path / "fn.zip")
    dst = tmp_path / "fn.zip.zst"

    report = repack.add_layer(src, dst, "zstd", level=3)

    assert report.kept and report.size == dst.stat().st_size < src.stat().st_size
    assert codec.detect_layers(dst) == ["zstd", "zip"]
    assert report.describe().startswith(f"compressed {src.stat().st_size} -> {report.size} bytes")


def test_random_bytes_are_skipped_after_a_fast_pass_without_a_layer_at_the_level(
    tmp_path: Path,
) -> None:
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(1 << 20))

    report = repack.add_layer(src, tmp_path / "random.zst", "zstd", level=19)

    assert (report.kept, report.size) == (False, None)  # never compressed at level 19
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.bin"]
    assert report.describe() == (
        "skipped the zstd level 19 layer: a fast pass (zstd level 1) could not shrink "
        f"{1 << 20} bytes (random or already compressed); uploading them as they are"
    )


def test_a_layer_that_comes_out_larger_is_not_kept(tmp_path: Path) -> None:
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(256 << 10))

    report = repack.add_layer(src, tmp_path / "random.xz", "xz", level=0)  # no fast pass: in full

    assert not report.kept and report.size is not None and report.size > 256 << 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.bin"]
    assert f"{report.size} bytes is not smaller than {256 << 10}" in report.describe()


def test_the_fast_pass_is_the_codecs_own_so_gzip_keeps_what_zstd_cannot_shrink(
    tmp_path: Path,
) -> None:
    src = tmp_path / "skewed.bin"
    src.write_bytes(skewed(1 << 20))

    gzip_layer = repack.add_layer(src, tmp_path / "skewed.gz", "gzip")
    zstd_layer = repack.add_layer(src, tmp_path / "skewed.zst", "zstd")

    assert gzip_layer.kept and gzip_layer.size is not None and gzip_layer.size < 0.97 * (1 << 20)
    assert not zstd_layer.kept


@pytest.mark.parametrize(
    ("fmt", "level", "error"),
    [("zstd", 23, "zstd levels are 1..22 (default 19), not 23"),
     ("gzip", 0, "gzip levels are 1..9 (default 9), not 0"),
     ("xz", 10, "xz levels are 0..9 (default 6), not 10")],
)  # fmt: skip
def test_a_level_outside_the_codecs_range_is_refused_naming_the_range(
    fmt: str, level: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        repack.check_level(fmt, level)
    assert repack.check_level(fmt, None) == repack.DEFAULT_LEVELS[fmt]


@pytest.mark.slow
def test_publish_uploads_random_bytes_as_they_are_and_says_why(tmp_path: Path) -> None:
    package = tmp_path / "model.bin"
    package.write_bytes(os.urandom(1 << 20))

    out = publish_cli(tmp_path, package, "--compress", "zstd")

    assert out.returncode == 0, out.stderr
    assert "skipped the zstd level 19 layer: a fast pass (zstd level 1)" in out.stderr
    assert out.stdout.strip() == "sha256:" + hashlib.sha256(package.read_bytes()).hexdigest()


@pytest.mark.slow
def test_publish_takes_the_chosen_level_and_refuses_one_out_of_range(tmp_path: Path) -> None:
    package = python_like_zip(tmp_path / "fn.zip")

    chosen = publish_cli(tmp_path, package, "--compress", "zstd", "--compress-level", "3")
    wrong = publish_cli(tmp_path, package, "--compress", "zstd", "--compress-level", "30")
    alone = publish_cli(tmp_path, package, "--compress-level", "3")

    assert chosen.returncode == 0 and "(zstd level 3, -" in chosen.stderr
    digest = chosen.stdout.strip().removeprefix("sha256:")
    assert codec.detect_layers(tmp_path / "origin" / "blobs" / "sha256" / digest) == ["zstd", "zip"]
    assert wrong.returncode == 1
    assert (
        wrong.stderr == f"cachesvc: publish {package}: zstd levels are 1..22 (default 19), not 30\n"
    )
    assert alone.returncode == 1 and "--compress-level needs --compress" in alone.stderr

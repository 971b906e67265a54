"""Verified reads: a chunk or an entry comes back only as the bytes its index
promised, whatever range of bytes a tier handed over."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import zstandard

from cachesvc.errors import DigestMismatch, UnsupportedFormat
from cachesvc.unpack.chunks import (
    LocalPackage,
    Window,
    iter_entry,
    read_chunk,
    read_entry,
    read_range,
)
from cachesvc.unpack.frames import compress_frame, decode_frame
from cachesvc.unpack.index import Entry, Index, IndexRef
from tests.indexes import FILES, build, parse_package, rejoin, split


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, IndexRef]:
    return build(tmp_path_factory.mktemp("indexed"))


def entry_of(index: Index, path: str) -> Entry:
    entry = index.entry(path)
    assert entry is not None
    return entry


def test_one_chunk_reads_from_a_window_of_just_its_frame(package: tuple[bytes, IndexRef]) -> None:
    data, ref = package
    big = entry_of(parse_package(data, ref), "lib/sub/data.bin")
    for number, chunk in enumerate(big.chunks):
        window = Window(data[chunk.offset : chunk.offset + chunk.length], chunk.offset)
        expected = FILES["lib/sub/data.bin"][chunk.start : chunk.start + chunk.size]
        assert read_chunk(big, number, window) == expected


def test_every_entry_reads_back_from_the_local_file(
    package: tuple[bytes, IndexRef], tmp_path: Path
) -> None:
    (tmp_path / "pkg").write_bytes(package[0])
    index = parse_package(*package)
    with LocalPackage(tmp_path / "pkg") as source:
        assert {e.path: read_entry(e, source) for e in index.files} == FILES


def test_any_flipped_byte_of_any_frame_is_a_digest_mismatch(
    package: tuple[bytes, IndexRef],
) -> None:
    data, ref = package
    index = parse_package(data, ref)
    for entry in index.files:
        for number, chunk in enumerate(entry.chunks):
            for at in {0, 5, chunk.length // 2, chunk.length - 1}:
                bad = bytearray(data)
                bad[chunk.offset + at] ^= 0x40
                with pytest.raises(DigestMismatch):
                    read_chunk(entry, number, Window(bytes(bad), 0))


def test_a_short_range_is_a_digest_mismatch(package: tuple[bytes, IndexRef]) -> None:
    data, ref = package
    util = entry_of(parse_package(data, ref), "lib/util.py")
    chunk = util.chunks[0]
    short = Window(data[chunk.offset : chunk.offset + chunk.length - 1], chunk.offset)
    with pytest.raises(DigestMismatch, match="frame of"):
        read_chunk(util, 0, short)


def test_a_valid_frame_of_other_bytes_is_a_digest_mismatch(package: tuple[bytes, IndexRef]) -> None:
    data, ref = package
    util = entry_of(parse_package(data, ref), "lib/util.py")
    chunk = util.chunks[0]
    other = compress_frame(b"import sys\n" * 50, 3)
    patched = data[: chunk.offset] + other + data[chunk.offset + len(other) :]
    with pytest.raises(DigestMismatch):
        read_chunk(util, 0, Window(patched, 0))


def test_the_last_chunk_is_held_back_until_the_whole_file_checks(
    package: tuple[bytes, IndexRef],
) -> None:
    data, doc = split(package[0])
    doc = copy.deepcopy(doc)
    big = next(e for e in doc["entries"] if e["path"] == "lib/sub/data.bin")  # type: ignore[attr-defined]
    big["sha256"] = "0" * 64  # its chunks still verify; the whole file does not
    crafted, ref = rejoin(data, doc)
    entry = entry_of(parse_package(crafted, ref), "lib/sub/data.bin")
    got: list[bytes] = []
    with pytest.raises(DigestMismatch):
        for piece in iter_entry(entry, Window(crafted, 0)):
            got.append(piece)
    assert len(got) == len(entry.chunks) - 1


def test_an_empty_file_reads_as_nothing_and_checks(package: tuple[bytes, IndexRef]) -> None:
    data, ref = package
    assert read_entry(entry_of(parse_package(data, ref), "lib/empty.txt"), Window(b"", 0)) == b""


def test_a_frame_must_declare_its_size_and_be_one_whole_frame() -> None:
    good = compress_frame(b"x" * 1000, 3)
    assert decode_frame(good, 1000, "t") == b"x" * 1000
    sink = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(sink, closefd=False) as writer:
        writer.write(b"x" * 1000)  # a stream: no size in the header
    refused = {
        "declares no size": sink.getvalue(),
        "declares 1000 bytes, not 999": good,
        "bytes after the frame": good + b"\x00",
        "truncated": good[:-1],
        "not a zstd frame": b"PK\x03\x04" + good,
    }
    for rule, frame in refused.items():
        with pytest.raises(UnsupportedFormat, match=rule):
            decode_frame(frame, 999 if "999" in rule else 1000, "t")


def test_a_frame_that_asks_for_a_huge_window_is_refused() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=26)
    sink = io.BytesIO()
    compressor = zstandard.ZstdCompressor(compression_params=params)
    with compressor.stream_writer(sink, closefd=False, size=64 << 20) as writer:
        writer.write(bytes(64 << 20))
    with pytest.raises(UnsupportedFormat, match="window"):
        decode_frame(sink.getvalue(), 64 << 20, "t")


class Counting:
    """A source that records the ranges asked of it."""

    def __init__(self, data: bytes) -> None:
        self.window = Window(data, 0)
        self.asked: list[int] = []

    def read_range(self, offset: int, length: int) -> bytes:
        self.asked.append(offset)
        return self.window.read_range(offset, length)


@pytest.mark.parametrize(
    ("offset", "size", "chunks"),
    [
        (0, 10, [0]),
        (524_288 - 5, 10, [0, 1]),  # across a chunk boundary
        (524_288, 524_288, [1]),
        (1_000_000, 10**9, [1, 2]),  # past the end: what there is
        (1_280_000, 10, []),
        (0, 0, []),
    ],
)
def test_a_range_reads_only_the_chunks_that_cover_it(
    package: tuple[bytes, IndexRef], offset: int, size: int, chunks: list[int]
) -> None:
    data, ref = package
    big = entry_of(parse_package(data, ref), "lib/sub/data.bin")
    source = Counting(data)
    got = read_range(big, offset, size, source)
    assert got == FILES["lib/sub/data.bin"][offset : offset + size]
    assert source.asked == [big.chunks[n].offset for n in chunks]


def test_a_range_of_a_one_chunk_file_reads_its_one_frame(package: tuple[bytes, IndexRef]) -> None:
    data, ref = package
    util = entry_of(parse_package(data, ref), "lib/util.py")
    assert read_range(util, 7, 20, Window(data, 0)) == FILES["lib/util.py"][7:27]
    assert (
        read_range(entry_of(parse_package(data, ref), "lib/empty.txt"), 0, 5, Window(data, 0))
        == b""
    )

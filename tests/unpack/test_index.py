"""The index parser: trusted only through its digest, and then only for what
unpack itself would accept. Each crafted index here reaches the parser with a
digest that matches it, as a hostile publisher's would."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cachesvc.digest import Digest
from cachesvc.errors import DigestMismatch, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.index import (
    FOOTER,
    MAX_INDEX_FRAME,
    SKIPPABLE,
    Index,
    IndexRef,
    Kind,
    read_footer,
)
from tests.indexes import build, index_frame, parse_package, rejoin, split, with_frame

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, IndexRef]:
    return build(tmp_path_factory.mktemp("indexed"))


def crafted(package: tuple[bytes, IndexRef], change: Callable[[Doc], object]) -> Index:
    """Parse the package with its index changed by ``change`` (and re-digested);
    a ``change`` that returns bytes gives the index text itself."""
    data, doc = split(package[0])
    doc = copy.deepcopy(doc)
    result = change(doc)
    return parse_package(*rejoin(data, result if isinstance(result, bytes) else doc))


def file_entry(doc: Doc, path: str = "lib/util.py") -> Doc:
    return next(e for e in doc["entries"] if e["path"] == path)


def test_a_well_formed_index_parses_into_entries_in_package_order(
    package: tuple[bytes, IndexRef],
) -> None:
    index = parse_package(*package)
    assert [e.path for e in index.entries if e.kind is Kind.DIR] == ["bin", "lib", "lib/sub"]
    handler = index.entry("handler.py")
    assert handler is not None and handler.mode == 0o644 and handler.mtime == 1_700_000_000
    assert index.entry("bin/run").mode == 0o755  # type: ignore[union-attr]
    assert index.entry("lib/empty.txt").chunks == ()  # type: ignore[union-attr]
    offsets = [c.offset for e in index.files for c in e.chunks]
    assert offsets == sorted(offsets)


def test_an_index_that_does_not_hash_to_the_trusted_digest_is_refused_before_parsing(
    package: tuple[bytes, IndexRef],
) -> None:
    data, ref = package
    other = IndexRef(Digest.parse("0" * 64), ref.size)
    with pytest.raises(DigestMismatch, match="index"):
        parse_package(data, other)


def test_a_tail_shorter_than_the_reference_says_is_refused(
    package: tuple[bytes, IndexRef],
) -> None:
    data, ref = package
    with pytest.raises(DigestMismatch):
        parse_package(data, IndexRef(ref.digest, ref.size + 1))
    with pytest.raises(DigestMismatch):
        parse_package(data[-ref.size :], ref)  # the whole package is shorter than its tail


def test_a_tail_without_the_footer_is_wrong_bytes_for_a_reader_that_holds_an_index_ref(
    package: tuple[bytes, IndexRef],
) -> None:
    data, ref = package
    with pytest.raises(DigestMismatch, match="not an indexed package"):
        parse_package(data[: -FOOTER.size] + bytes(FOOTER.size), ref)


def test_a_footer_is_read_strictly(package: tuple[bytes, IndexRef]) -> None:
    data, ref = package
    assert read_footer(data[-FOOTER.size :], len(data)) == (len(data) - ref.tail, ref.size)
    with pytest.raises(UnsupportedFormat, match="not an indexed package"):
        read_footer(bytes(FOOTER.size), len(data))
    with pytest.raises(UnsupportedFormat, match="does not end"):
        read_footer(data[-FOOTER.size :], len(data) + 1)
    with pytest.raises(UnsupportedFormat, match="bytes, not 32"):
        read_footer(data[-10:], len(data))


def set_path(value: object) -> Callable[[Doc], None]:
    return lambda doc: file_entry(doc).update(path=value)


REFUSED: dict[str, tuple[Callable[[Doc], object], type[Exception], str]] = {
    "a .. component": (set_path("lib/../../etc/x"), UnsafeArchive, r"'\.\.'"),
    "an absolute path": (set_path("/etc/passwd"), UnsafeArchive, "absolute"),
    "a NUL byte": (set_path("lib/a\x00b"), UnsafeArchive, "NUL"),
    "a path over 256 levels": (set_path("lib/" + "d/" * 300 + "f"), UnsupportedFormat, "levels"),
    "a name part over 255 bytes": (set_path("lib/" + "x" * 256), UnsupportedFormat, "255"),
    "a path not canonical": (set_path("lib//util.py"), UnsupportedFormat, "canonical"),
    "a path before its directory": (set_path("nodir/util.py"), UnsupportedFormat, "directory"),
    "a path under a file": (set_path("handler.py/x"), UnsupportedFormat, "directory"),
    "a lone surrogate": (set_path("lib/\udcff"), UnsupportedFormat, "UTF-8"),
    "a duplicate path": (set_path("handler.py"), UnsafeArchive, "duplicate"),
    "a symlink": (lambda d: file_entry(d).update(type="symlink"), UnsafeArchive, "links"),
    "a device": (lambda d: file_entry(d).update(type="char"), UnsafeArchive, "devices"),
    "an unknown type": (lambda d: file_entry(d).update(type="whiteout"), UnsupportedFormat, "type"),
    "a type that is a list": (
        lambda d: file_entry(d).update(type=["dir"]),
        UnsupportedFormat,
        "type",
    ),
    "a setuid mode": (lambda d: file_entry(d).update(mode=0o4755), UnsupportedFormat, "mode"),
    "a writable dir": (lambda d: d["entries"][0].update(mode=0o777), UnsupportedFormat, "mode"),
    "a mode as a string": (
        lambda d: file_entry(d).update(mode="644"),
        UnsupportedFormat,
        "integer",
    ),
    "a size as a bool": (lambda d: file_entry(d).update(size=True), UnsupportedFormat, "integer"),
    "an mtime of 1e400": (lambda d: file_entry(d).update(mtime=1e400), UnsupportedFormat, "Inf"),
    "an mtime of 1.5": (lambda d: file_entry(d).update(mtime=1.5), UnsupportedFormat, "integer"),
    "an mtime of 2**40": (
        lambda d: file_entry(d).update(mtime=2**40),
        UnsupportedFormat,
        "outside",
    ),
    "an unknown key": (lambda d: file_entry(d).update(uid=0), UnsupportedFormat, "keys"),
    "a missing key": (lambda d: file_entry(d).pop("sha256"), UnsupportedFormat, "keys"),
    "a bad sha256": (lambda d: file_entry(d).update(sha256="AB" * 32), UnsupportedFormat, "hex"),
    "a size its chunks do not hold": (
        lambda d: file_entry(d).update(size=10**7),
        UnsupportedFormat,
        "chunks",
    ),
    "a frame past the tar frames": (
        lambda d: file_entry(d)["chunks"][0].__setitem__(0, d["data_size"] - 1),
        UnsupportedFormat,
        "ends past",
    ),
    "overlapping frames": (
        lambda d: file_entry(d, "lib/sub/data.bin")["chunks"][1].__setitem__(
            0, file_entry(d, "lib/sub/data.bin")["chunks"][0][0]
        ),
        UnsupportedFormat,
        "outside",
    ),
    "a frame of length 0": (
        lambda d: file_entry(d)["chunks"][0].__setitem__(1, 0),
        UnsupportedFormat,
        "outside",
    ),
    "a chunk without its own sha256": (
        lambda d: file_entry(d, "lib/sub/data.bin")["chunks"][0].pop(),
        UnsupportedFormat,
        "fields",
    ),
    "another version": (lambda d: d.update(version=2), UnsupportedFormat, "version"),
    "a data_size off by one": (
        lambda d: d.update(data_size=d["data_size"] - 1),
        UnsupportedFormat,
        "data_size",
    ),
    "a chunk size of 1 byte": (lambda d: d.update(chunk_size=1), UnsupportedFormat, "chunk_size"),
    "a duplicate key": (
        lambda d: json.dumps(d)[:-1].encode() + b', "version": 1}',
        UnsupportedFormat,
        "duplicate key",
    ),
    "NaN": (
        lambda d: json.dumps(d).replace('"version": 1', '"version": NaN').encode(),
        UnsupportedFormat,
        "NaN",
    ),  # fmt: skip
    "not JSON": (lambda d: b"{" * 100_000, UnsupportedFormat, "not JSON"),
    "deep nesting": (lambda d: b"[" * 100_000 + b"]" * 100_000, UnsupportedFormat, "JSON"),
    "a list at the top": (lambda d: b"[]", UnsupportedFormat, "not an object"),
    "latin-1 text": (lambda d: b'{"format": "\xe9"}', UnsupportedFormat, "not JSON"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_crafted_index_is_refused_naming_its_rule(
    package: tuple[bytes, IndexRef], case: str
) -> None:
    change, error, rule = REFUSED[case]
    with pytest.raises(error, match=rule):
        crafted(package, change)


def test_more_entries_than_an_unpack_allows_is_too_large(package: tuple[bytes, IndexRef]) -> None:
    with pytest.raises(TooLarge, match="entries"):
        parse_package(*package, limits=Limits(max_files=4))


def test_more_bytes_than_an_unpack_allows_is_too_large(package: tuple[bytes, IndexRef]) -> None:
    with pytest.raises(TooLarge, match="unpacks to over"):
        parse_package(*package, limits=Limits(max_unpacked_size=1_000_000))


def test_a_bomb_of_sizes_is_too_large_by_ratio(package: tuple[bytes, IndexRef]) -> None:
    with pytest.raises(TooLarge, match="x the package"):
        parse_package(*package, limits=Limits(max_ratio=1))


def test_an_index_that_decodes_past_its_bound_is_too_large(
    package: tuple[bytes, IndexRef],
) -> None:
    data, _ = split(package[0])
    with pytest.raises(TooLarge, match="index decodes to"):
        parse_package(*rejoin(data, b" " * (33 << 20)))


def test_an_index_frame_that_is_not_one_zstd_frame_is_refused(
    package: tuple[bytes, IndexRef], tmp_path: Path
) -> None:
    data, doc = split(package[0])
    frame = index_frame(json.dumps(doc).encode())
    for bad, rule in [
        (frame + b"x", "wrong magic or size"),  # the skippable size no longer matches
        (frame[:8] + frame[8:-1], "wrong magic or size"),
        (b"\x50\x2a\x4d\x18" + frame[4:], "wrong magic"),
    ]:
        with pytest.raises(UnsupportedFormat, match=rule):
            parse_package(*with_frame(data, bad))


def test_an_index_ref_is_bounded_before_anything_is_fetched() -> None:
    digest = Digest.parse("0" * 64)
    with pytest.raises(TooLarge):
        IndexRef(digest, MAX_INDEX_FRAME + 1)
    with pytest.raises(UnsupportedFormat):
        IndexRef(digest, SKIPPABLE.size)

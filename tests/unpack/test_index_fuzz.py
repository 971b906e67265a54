"""Fuzzing the index parser and the verified reader with indexed packages that
start valid and go wrong.

Each case is a package written by the real writer, then changed one of five ways:

* ``doc``: the index JSON edited where it counts (any value replaced by a
  hostile one, keys and list items dropped, duplicated or added), re-digested;
* ``text``: the index JSON text with bytes flipped or cut, re-digested;
* ``frame``: the index frame's bytes (skippable header, zstd frame) flipped
  or cut, re-digested;
* ``tail``: bytes of the package's tail flipped with the old index digest kept
  (a tier sent wrong bytes);
* ``data``: bytes of the tar frames flipped, the index intact.

A re-digested index is what a hostile publisher can hand the parser. The
properties: :func:`parse_package` answers within a bound with an index or a
contract error (:class:`DigestMismatch` only when the digest was kept); an
index it accepts keeps every rule (names as unpack takes them, directories
first, frames in order inside the tar frames, chunk sizes that add up); and
reading any of its files, whole or a range, gives the bytes whose sha256 the
index names, or :class:`DigestMismatch`, never anything else (for ``data``: the original
bytes or :class:`DigestMismatch`). Budgets as in ``test_unpack_fuzz``
(``make fuzz`` runs the long one).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from functools import cache
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, cast

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from cachesvc.errors import DigestMismatch, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.chunks import Window, read_entry, read_range
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.index import FOOTER, SKIPPABLE, Index, IndexRef, Kind
from cachesvc.unpack.tree import member_parts
from tests import mutants
from tests.fuzzing import LONG, budget
from tests.indexes import FILES, build, index_frame, parse_package, split, with_frame

CONTRACT = (TooLarge, UnsafeArchive, UnsupportedFormat)
PARSE_BOUND = 5.0
LIMITS = Limits(max_files=1000, max_unpacked_size=64 << 20)
SEEDS = {
    "default": FILES,
    "one file": {"handler.py": b"print('hi')\n"},
    "deep and many": {f"{'d/' * (i % 7)}m{i}.py": b"x = %d\n" % i * i for i in range(40)},
}
HOSTILE: list[object] = [
    -1, 0, 1, 7, 511, 2**31, 2**63, 2**64, 10**30, 1.5, 1e308, True, False, None,
    "", "file", "dir", "symlink", "fifo", "0" * 64, "sha256:" + "0" * 64, [], {}, [[0, 1]],
    [[0, 1, "0" * 64]], "cachesvc.index", 0o644, 0o755, 0o4755, 524288, 1_700_000_000,
]  # fmt: skip
Seed = tuple[bytes, IndexRef, dict[str, bytes]]

pytestmark = [pytest.mark.timeout(0 if LONG else 300), pytest.mark.slow]  # fuzzing


@cache
def seed(name: str) -> Seed:
    with TemporaryDirectory(prefix="cachesvc-index-fuzz-") as tmp:
        data, ref = build(Path(tmp), SEEDS[name])
    return data, ref, SEEDS[name]


def locations(doc: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in ``doc`` a value sits, as key paths from the top."""
    found = [path] if path else []
    items: list[tuple[object, object]] = []
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    for key, value in items:
        found += locations(value, (*path, key))
    return found


def edit(draw: st.DrawFn, doc: Any) -> None:
    """One structural change at a place hypothesis picks."""
    where = draw(st.sampled_from(locations(doc)))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    key = where[-1]
    action = draw(st.sampled_from(["value", "value", "name", "drop", "copy", "add"]))
    if action == "value":
        parent[key] = copy.deepcopy(draw(st.sampled_from(HOSTILE)))  # the pool stays as it is
    elif action == "name":
        parent[key] = draw(mutants.names)
    elif action == "drop":
        del parent[key]
    elif action == "copy" and isinstance(parent, list):
        parent.insert(draw(st.integers(0, len(parent))), copy.deepcopy(parent[cast(int, key)]))
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(["uid", "path", "type", "xattrs", "link"]))] = 0


def flip(draw: st.DrawFn, raw: bytes, start: int = 0, cut: bool = True) -> bytes:
    """``raw`` with a few bytes from ``start`` on flipped, maybe cut short."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        if len(data) > start:
            data[draw(st.integers(start, len(data) - 1))] ^= draw(st.integers(1, 255))
    if cut and draw(st.integers(0, 5)) == 0:
        del data[draw(st.integers(start, len(data))) :]
    return bytes(data)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, bytes, IndexRef, dict[str, bytes]]:
    """(how it went wrong, package, the index ref a reader trusts, the seed's files)."""
    package, ref, files = seed(draw(st.sampled_from(sorted(SEEDS))))
    how = draw(st.sampled_from(["doc", "text", "frame", "tail", "data"]))
    data, doc = split(package)
    if how == "doc":
        for _ in range(draw(st.integers(1, 4))):
            edit(draw, doc)
        package, ref = with_frame(data, index_frame(json.dumps(doc).encode()))
    elif how == "text":
        package, ref = with_frame(data, index_frame(flip(draw, json.dumps(doc).encode())))
    elif how == "frame":
        frame = flip(draw, package[len(data) : -FOOTER.size])
        package, ref = with_frame(data, frame.ljust(SKIPPABLE.size + 1, b"\x00"))
    elif how == "tail":
        package = flip(draw, package, max(0, len(package) - ref.tail))
    else:
        package = flip(draw, data, cut=False) + package[len(data) :]
    return how, package, ref, files


def check_rules(index: Index) -> None:
    """What an accepted index promises, restated independently of the parser."""
    kinds: dict[str, Kind] = {}
    end = 0
    for entry in index.entries:
        parts = member_parts(entry.path)
        assert parts and "/".join(parts) == entry.path and entry.path not in kinds
        assert len(parts) == 1 or kinds.get("/".join(parts[:-1])) is Kind.DIR
        kinds[entry.path] = entry.kind
        assert entry.mode in ((0o755,) if entry.kind is Kind.DIR else (0o644, 0o755))
        assert sum(chunk.size for chunk in entry.chunks) == entry.size
        for chunk in entry.chunks:
            assert end <= chunk.offset and chunk.length > 0
            end = chunk.offset + chunk.length
    assert end <= index.data_size
    assert len(index.entries) <= LIMITS.max_files


def read_all(how: str, index: Index, package: bytes, files: dict[str, bytes]) -> None:
    """Every file reads back as the bytes its index names, or DigestMismatch."""
    for entry in list(index.files)[:50]:
        try:
            got = read_entry(entry, Window(package, 0))
        except DigestMismatch:
            event(f"{how}: a read refused wrong bytes")
            continue
        assert entry.sha256 is not None
        assert hashlib.sha256(got).hexdigest() == entry.sha256.hex
        start, size = entry.size // 3, entry.size // 2 + 1
        assert read_range(entry, start, size, Window(package, 0)) == got[start : start + size]
        if how in ("data", "tail"):  # the index is the writer's: so are the bytes
            assert got == files[entry.path]


@given(case=cases())
@budget(short=400, scale=10)
def test_the_index_parser_answers_any_mutated_index_with_an_index_or_a_contract_error(
    case: tuple[str, bytes, IndexRef, dict[str, bytes]],
) -> None:
    how, package, ref, files = case
    started = time.monotonic()
    try:
        index = parse_package(package, ref, LIMITS)
    except CONTRACT as exc:
        index, outcome = None, exc.code
    except DigestMismatch as exc:
        assert how == "tail", "a re-digested index is never a digest mismatch"
        index, outcome = None, exc.code
    assert time.monotonic() - started < PARSE_BOUND
    if index is None:
        event(f"{how}: {outcome}")
        return
    event(f"{how}: parsed")
    check_rules(index)
    read_all(how, index, package, files)

"""An unpacked tree is checked against the index before it may replace a mount
of it: the tar and the index of a crafted package may describe two trees."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cachesvc.errors import UnsafeArchive
from cachesvc.unpack.agree import check_tree
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import extract
from cachesvc.unpack.index import Index, IndexRef
from tests.indexes import build, parse_package, rejoin, split


@pytest.fixture
def unpacked(tmp_path: Path) -> tuple[bytes, IndexRef, Path]:
    package, ref = build(tmp_path)
    (tmp_path / "pkg").write_bytes(package)
    (tmp_path / "tree").mkdir()
    extract(tmp_path / "pkg", tmp_path / "tree", Limits())
    return package, ref, tmp_path / "tree"


def crafted(package: bytes, change: Callable[[dict[str, Any]], None]) -> Index:
    data, doc = split(package)
    doc = copy.deepcopy(doc)
    change(doc)
    return parse_package(*rejoin(data, doc))


def entry(doc: dict[str, Any], path: str) -> dict[str, Any]:
    return next(e for e in doc["entries"] if e["path"] == path)


def test_the_tree_unpack_makes_of_our_package_is_its_index(
    unpacked: tuple[bytes, IndexRef, Path],
) -> None:
    package, ref, tree = unpacked
    check_tree(parse_package(package, ref), tree)


DISAGREE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "another sha256": (lambda d: entry(d, "lib/util.py").update(sha256="0" * 64), "bytes"),
    "another mode": (lambda d: entry(d, "lib/util.py").update(mode=0o755), "mode"),
    "another mtime": (lambda d: entry(d, "lib/util.py").update(mtime=1), "mtime"),
    "one entry fewer": (lambda d: d["entries"].remove(entry(d, "handler.py")), "lacks"),
    "one entry more": (
        lambda d: d["entries"].insert(0, {"path": "x", "type": "dir", "mode": 493, "mtime": 0}),
        "lacks the index's 'x'",
    ),
}


@pytest.mark.parametrize("case", DISAGREE)
def test_a_tree_and_an_index_that_disagree_are_refused(
    unpacked: tuple[bytes, IndexRef, Path], case: str
) -> None:
    change, rule = DISAGREE[case]
    package, _, tree = unpacked
    with pytest.raises(UnsafeArchive, match=rule):
        check_tree(crafted(package, change), tree)


def test_a_file_changed_on_disk_after_unpack_is_refused(
    unpacked: tuple[bytes, IndexRef, Path],
) -> None:
    package, ref, tree = unpacked
    target = tree / "lib" / "util.py"
    stat = target.stat()
    target.write_bytes(target.read_bytes().replace(b"os", b"sy"))
    os.utime(target, (stat.st_atime, stat.st_mtime))
    with pytest.raises(UnsafeArchive, match="bytes"):
        check_tree(parse_package(package, ref), tree)


def test_a_link_where_the_index_has_a_file_is_refused(
    unpacked: tuple[bytes, IndexRef, Path],
) -> None:
    package, ref, tree = unpacked
    (tree / "handler.py").unlink()
    (tree / "handler.py").symlink_to("lib/util.py")
    with pytest.raises(UnsafeArchive, match="not a file"):
        check_tree(parse_package(package, ref), tree)

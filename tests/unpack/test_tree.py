"""The tree writer's own rules, each observable on its own: names, modes, times, disk errors."""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from pathlib import Path
from unittest import mock

import pytest

from cachesvc.errors import CachesvcError, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.tree import Tree, member_parts, sane_mtime, walk


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("a/../../evil.txt", "'..'"),
        ("..", "'..'"),
        ("ok/..", "'..'"),
        ("/etc/passwd", "absolute"),
        ("\\windows\\evil", "absolute"),
        ("C:evil", "absolute"),
        ("a\x00b", "NUL"),
    ],
)
def test_member_parts_refuses_each_escape_naming_its_rule(name: str, rule: str) -> None:
    with pytest.raises(UnsafeArchive, match=rule):
        member_parts(name)


def test_member_parts_refuses_names_linux_cannot_hold_before_any_system_call() -> None:
    with pytest.raises(UnsupportedFormat, match="over 4096 bytes"):
        member_parts("d/" * 2100 + "f")
    with pytest.raises(UnsupportedFormat, match="part over 255 bytes"):
        member_parts("d/" + "x" * 256)


def test_member_parts_refuses_trees_deeper_than_recursive_tools_can_walk() -> None:
    assert len(member_parts("d/" * 255 + "f")) == 256
    with pytest.raises(UnsupportedFormat, match="over 256 levels deep"):
        member_parts("d/" * 256 + "f")
    with pytest.raises(UnsupportedFormat, match="over 256 levels deep"):
        member_parts("d/" * 2000 + "f")  # within PATH_MAX, past Python's recursion limit


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b/c.py", ["a", "b", "c.py"]),
        ("./a//b/./c", ["a", "b", "c"]),
        ("dir/", ["dir"]),
        ("a..b/..c/d..", ["a..b", "..c", "d.."]),  # dots inside a name are fine
        ("ünï/cødé", ["ünï", "cødé"]),
    ],
)
def test_member_parts_keeps_ordinary_names(name: str, parts: list[str]) -> None:
    assert member_parts(name) == parts


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e400, 2.0**40, -(2.0**40)])
def test_an_absurd_mtime_is_ignored_not_an_error(value: float) -> None:
    assert sane_mtime(value) is None


def test_a_real_mtime_is_kept() -> None:
    assert sane_mtime(1_600_000_000) == 1_600_000_000.0
    assert sane_mtime(-86_400.5) == -86_400.5  # 1969 happens
    assert sane_mtime(None) is None


def test_a_file_with_an_infinite_mtime_is_written_with_the_current_time(tmp_path: Path) -> None:
    tree = Tree(tmp_path, Limits(), packed_size=100)
    tree.add_file("a.txt", io.BytesIO(b"hi"), 0o644, math.inf)
    assert (tmp_path / "a.txt").read_bytes() == b"hi"
    assert abs((tmp_path / "a.txt").stat().st_mtime - os.path.getmtime(tmp_path)) < 60


def test_modes_are_sanitised(tmp_path: Path) -> None:
    tree = Tree(tmp_path, Limits(), packed_size=100)
    tree.add_file("bin/run", io.BytesIO(b"#!"), 0o6777, None)
    tree.add_file("data", io.BytesIO(b"x"), 0o666, None)
    assert stat.S_IMODE((tmp_path / "bin/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "bin").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o644


def test_a_file_where_a_directory_is_needed_is_a_conflict(tmp_path: Path) -> None:
    tree = Tree(tmp_path, Limits(), packed_size=100)
    tree.add_file("a", io.BytesIO(b"1"), 0o644, None)
    with pytest.raises(UnsafeArchive, match="conflicting"):
        tree.add_file("a/b", io.BytesIO(b"2"), 0o644, None)
    with pytest.raises(UnsafeArchive, match="conflicting"):
        tree.add_file("a", io.BytesIO(b"3"), 0o644, None)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.ENOSPC, TooLarge),
        (errno.EDQUOT, TooLarge),
        (errno.EFBIG, TooLarge),
        (errno.ENAMETOOLONG, UnsupportedFormat),
        (errno.EIO, CachesvcError),  # this host's fault, not the package's: a 500
    ],
)
def test_a_write_error_becomes_the_contract_error_it_means(
    tmp_path: Path, code: int, error: type[CachesvcError]
) -> None:
    tree = Tree(tmp_path, Limits(), packed_size=100)
    with mock.patch("os.write", side_effect=OSError(code, os.strerror(code))):
        with pytest.raises(error) as raised:
            tree.add_file("a.bin", io.BytesIO(b"data"), 0o644, None)
    assert type(raised.value) is error
    assert "a.bin" in str(raised.value)


def test_a_read_error_of_the_member_is_not_blamed_on_the_disk(tmp_path: Path) -> None:
    class Corrupt(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise OSError("Invalid data stream")  # what bz2 raises: no errno

    tree = Tree(tmp_path, Limits(), packed_size=100)
    with pytest.raises(OSError, match="Invalid data stream") as raised:
        tree.add_file("a.bin", Corrupt(), 0o644, None)
    assert not isinstance(raised.value, CachesvcError)  # extract maps it: corrupt archive


def test_entries_bytes_and_ratio_are_counted_on_what_is_written(tmp_path: Path) -> None:
    tree = Tree(tmp_path / "e", Limits(max_files=2), packed_size=100)
    (tmp_path / "e").mkdir()
    tree.add_dir("d")
    tree.add_file("d/f", io.BytesIO(b""), 0o644, None)
    with pytest.raises(TooLarge, match="over 2 entries"):
        tree.add_dir("d2")

    (tmp_path / "r").mkdir()
    tree = Tree(tmp_path / "r", Limits(max_ratio=1), packed_size=10)
    with pytest.raises(TooLarge, match="1x"):
        tree.add_file("big", io.BytesIO(bytes(2 * 1024 * 1024)), 0o644, None)


def test_walk_lists_every_path_with_its_lstat_and_enters_no_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "tree", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.py").write_bytes(b"x")
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (root / "link").symlink_to(outside)
    found = dict(walk(root))
    assert sorted(found) == ["a", "a/b", "a/b/f.py", "link"]
    assert stat.S_ISLNK(found["link"].st_mode) and found["a/b/f.py"].st_size == 1

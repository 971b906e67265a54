"""remove_tree: any shape a crash or a hostile archive can leave is removed,
and nothing outside it is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachesvc.fsutil import remove_tree
from tests.trees import deep_tree


@pytest.mark.slow
def test_removes_a_tree_deeper_than_the_recursion_limit_and_path_max(tmp_path: Path) -> None:
    target = tmp_path / "deep"
    deep_tree(target, 3000, name="x" * 200)  # ~600 KB of path, 3000 levels
    assert remove_tree(target)
    assert not target.exists()


def test_links_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    target = tmp_path / "tree"
    (target / "a" / "b").mkdir(parents=True)
    (target / "a" / "to-dir").symlink_to(outside)
    (target / "a" / "b" / "to-file").symlink_to(outside / "keep")
    (target / "dangling").symlink_to(tmp_path / "nowhere")
    assert remove_tree(target)
    assert not target.exists()
    assert (outside / "keep").read_text() == "precious"


def test_a_link_itself_is_removed_and_its_target_kept(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "f").exists()


def test_directories_without_permissions_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "locked"
    (target / "inner").mkdir(parents=True)
    (target / "inner" / "f").write_text("x")
    os.chmod(target / "inner", 0)
    os.chmod(target, 0o500)
    assert remove_tree(target)
    assert not target.exists()


def test_files_and_missing_paths(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert remove_tree(f)
    assert not f.exists()
    assert remove_tree(tmp_path / "never-was")


@pytest.mark.slow
def test_a_wide_tree_of_many_entries(tmp_path: Path) -> None:
    target = tmp_path / "wide"
    for i in range(50):
        d = target / f"d{i}" / "x" / "y"
        d.mkdir(parents=True)
        for j in range(20):
            (d / f"f{j}").write_bytes(b"z")
    assert remove_tree(target)
    assert not target.exists()

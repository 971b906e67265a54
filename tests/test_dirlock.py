"""DirLock: one owner per directory, in one process or many; never through a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachesvc.dirlock import DirLock
from cachesvc.errors import ConfigError


def test_a_second_owner_is_refused_with_the_path_and_the_holders_pid(tmp_path: Path) -> None:
    lock = DirLock.acquire(tmp_path / "cache", "cache dir")
    d = tmp_path / "cache"
    with pytest.raises(ConfigError) as refused:
        DirLock.acquire(d, "cache dir")
    assert str(refused.value) == f"cache dir {d} is in use by pid {os.getpid()} (lock {d}/.lock)"
    lock.release()
    lock.release()  # idempotent
    DirLock.acquire(d, "cache dir").release()  # free again once released


def test_a_link_named_like_the_lock_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    d = tmp_path / "code"
    d.mkdir()
    (d / ".lock").symlink_to(victim)
    lock = DirLock.acquire(d, "code dir")
    assert victim.read_text() == "precious"
    assert not (d / ".lock").is_symlink() and (d / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_fifo_or_directory_named_like_the_lock_is_replaced(tmp_path: Path) -> None:
    for i, make in enumerate((os.mkfifo, os.mkdir)):
        d = tmp_path / f"d{i}"
        d.mkdir()
        make(d / ".lock")
        DirLock.acquire(d, "cache dir").release()  # would block forever opening a fifo
        assert (d / ".lock").is_file()


def test_a_path_that_is_a_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=f"cache dir {tmp_path / 'f'}"):
        DirLock.acquire(tmp_path / "f", "cache dir")

"""The store's index: one diskcache row per committed package, ``hex -> Entry``
(size, last access, pin). Holds no bytes: a lost index is rebuilt from the
blobs.

* Opening never fails for what is on disk: a non-directory, a database SQLite
  refuses, or a settings table with keys diskcache would not write is moved
  to ``quarantine/`` (newest :data:`QUARANTINE_KEEP` kept) and a fresh index
  made; bad rows are deleted one by one.
* A tampered index cannot run code or remove files: values are unpickled
  without globals, rows naming a file are refused, unknown settings are
  quarantined before diskcache applies them. diskcache's culling is off (it
  deleted the row just inserted).

Blocking (SQLite): call from a thread.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import diskcache
from diskcache.core import DEFAULT_SETTINGS, METADATA, MODE_PICKLE

from cachesvc.digest import HEX
from cachesvc.errors import ConfigError
from cachesvc.fsutil import remove_tree

log = logging.getLogger(__name__)

DB_NAME = "cache.db"  # diskcache's database file inside the index directory
QUARANTINE_KEEP = 3
_KNOWN_SETTINGS = frozenset(DEFAULT_SETTINGS) | frozenset(METADATA)
# Every setting passed explicitly, so none is taken from the database.
_SETTINGS: dict[str, Any] = {
    **DEFAULT_SETTINGS,
    "eviction_policy": "none",
    "cull_limit": 0,  # diskcache's culling deletes the row just inserted (STACK.md)
    "size_limit": 2**62,
}


class Entry(NamedTuple):
    size: int
    last_access: float
    pinned: bool = False


class IndexCorrupt(Exception):
    """The index database cannot be trusted as a whole (not one bad row)."""


class _RowUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global (class, function) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"index rows hold plain tuples, not {module}.{name}")


class _SafeDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's serializer with what a tampered row could abuse taken out."""

    def __init__(self, directory: str, **_from_database: Any) -> None:
        # disk_* settings come from the database: ignore them, use ours.
        super().__init__(directory, min_file_size=2**15, pickle_protocol=pickle.HIGHEST_PROTOCOL)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:  # a pickled key: ours are always raw text
            raise ValueError("index key is not text")
        return super().get(key, raw)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode != MODE_PICKLE or filename is not None or value is None:
            raise ValueError(f"index row is not an inline entry (mode {mode}, file {filename!r})")
        return _RowUnpickler(io.BytesIO(bytes(value))).load()

    def remove(self, file_path: str) -> None:
        # Our rows never name files; a row that does was not written by us.
        log.warning("index: not removing %r named by a row (rows never name files)", file_path)


class Index:
    """The rows of one store. Open with :meth:`Index.open`."""

    def __init__(self, cache: diskcache.Cache) -> None:
        self._cache = cache

    @classmethod
    def open(cls, path: Path, quarantine: Path) -> tuple[Index, dict[str, Entry]]:
        """Open the index at ``path`` and read its valid rows; quarantine it and
        start empty if it cannot be trusted. Raises :class:`ConfigError` only
        when even a fresh index cannot be created (e.g. a read-only disk)."""
        problem = _problem(path)
        if problem is None:
            try:
                index = cls(_open_cache(path))
            except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
                problem = f"diskcache cannot open it: {exc}"
            else:
                try:
                    return index, index.rows()
                except IndexCorrupt as exc:
                    index.close()
                    problem = str(exc)
        moved = _quarantine(path, quarantine)
        log.error("store index %s: %s; moved it to %s and rebuilding it from the blobs",
                  path, problem, moved)  # fmt: skip
        try:
            return cls(_open_cache(path)), {}
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cache dir index {path}: cannot create it: {exc}") from exc

    def rows(self) -> dict[str, Entry]:
        """Every valid row; invalid ones are deleted. Raises :class:`IndexCorrupt`."""
        rows: dict[str, Entry] = {}
        try:
            for key in list(self._keys()):
                entry = self._entry(key)
                if entry is None:
                    self._cache.delete(key)
                else:
                    rows[key] = entry
        except (sqlite3.Error, OSError) as exc:
            raise IndexCorrupt(f"reading its rows failed: {exc}") from exc
        return rows

    def _keys(self) -> Iterator[Any]:
        keys = self._cache.iterkeys()
        while True:
            try:
                yield next(keys)
            except StopIteration:
                return
            except ValueError as exc:  # a pickled key: not ours, cannot be named
                raise IndexCorrupt(f"a key is not text: {exc}") from exc

    def _entry(self, key: Any) -> Entry | None:
        try:
            value = self._cache.get(key)
            entry = Entry(*value)
        except (ValueError, TypeError, pickle.UnpicklingError, EOFError) as exc:
            log.warning("index: dropping row %r: %s", key, exc)
            return None
        if not (isinstance(key, str) and HEX.fullmatch(key) and _valid(entry)):
            log.warning("index: dropping row %r: not a package entry (%r)", key, value)
            return None
        return entry

    def put_many(self, rows: dict[str, Entry]) -> None:
        """Write rows in one transaction."""
        with self._cache.transact():
            for key, entry in rows.items():
                self._cache[key] = tuple(entry)

    def delete(self, key: str) -> None:
        self._cache.delete(key)

    def close(self) -> None:
        self._cache.close()


def _valid(entry: Entry) -> bool:
    return (
        type(entry.size) is int
        and entry.size >= 0
        and type(entry.last_access) in (int, float)
        and type(entry.pinned) is bool
    )


def _open_cache(path: Path) -> diskcache.Cache:
    return diskcache.Cache(str(path), disk=_SafeDisk, **_SETTINGS)


def _problem(path: Path) -> str | None:
    """Why the index at ``path`` cannot be opened as is, or None (absent is fine)."""
    db = path / DB_NAME
    for p, is_kind, kind in ((path, stat.S_ISDIR, "a directory"), (db, stat.S_ISREG, "a file")):
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot stat {p.name}: {exc}"
        if not is_kind(mode):
            return f"{p.name} is not {kind}"
    return _database_problem(db)


def _database_problem(db: Path) -> str | None:
    """SQLite's own quick check, and the settings diskcache would apply."""
    try:
        con = sqlite3.connect(db, timeout=5)
    except sqlite3.Error as exc:
        return f"SQLite cannot open it: {exc}"
    try:
        verdict = con.execute("PRAGMA quick_check").fetchall()
        if verdict != [("ok",)]:
            return f"SQLite quick_check: {verdict[:3]}"
        if not con.execute("SELECT name FROM sqlite_master WHERE name='Settings'").fetchall():
            return None  # created but never initialised: diskcache will set it up
        keys = {k for (k,) in con.execute("SELECT key FROM Settings").fetchall()}
    except sqlite3.Error as exc:
        return f"SQLite cannot read it: {exc}"
    finally:
        con.close()
    unknown = keys - _KNOWN_SETTINGS
    return f"unknown settings {sorted(map(str, unknown))[:3]}" if unknown else None


def _quarantine(path: Path, quarantine: Path) -> Path:
    """Move ``path`` into ``quarantine`` (made a real directory first); keep the
    newest :data:`QUARANTINE_KEEP`. Falls back to removing it if it cannot move."""
    target = quarantine / f"index-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    try:
        _real_dir(quarantine)
        os.rename(path, target)
    except OSError as exc:
        log.error("cannot move %s to %s (%s): removing it instead", path, quarantine, exc)
        remove_tree(path)
        return Path(os.devnull)
    _trim(quarantine)
    return target


def _real_dir(path: Path) -> None:
    """Make ``path`` a directory, removing a file or link in its place."""
    if os.path.isdir(path) and not os.path.islink(path):
        return
    remove_tree(path)
    path.mkdir()


def _trim(quarantine: Path) -> None:
    kept = sorted(os.listdir(quarantine), reverse=True)  # names sort by time
    for name in kept[QUARANTINE_KEEP:]:
        remove_tree(quarantine / name)

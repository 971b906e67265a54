"""Start-up recovery of a store directory: whatever a crash, an operator or a
failing disk left is found, logged and removed; nothing found raises (only a
directory that cannot be created does). Never follows a link below the root.

What start-up checks (README "Trust"):

1. Layout (:func:`prepare_layout`): ``blobs/``, ``blobs/sha256/``, ``tmp/``
   are real directories; anything else in their place is removed.
2. Temp leftovers (:func:`sweep_tmp`): everything under ``tmp/``, any depth.
3. The index (:mod:`cachesvc.store.index`): quarantined and rebuilt if corrupt.
4. Blobs (:func:`scan_blobs`): only regular files named by 64 hex stay; a
   size that disagrees with its row is corrupt; a file without a row is
   re-hashed here and adopted only if it matches its name; rows without a
   file are dropped.

Files whose row and size agree are not read (a restart would read the whole
store): the scrub or their first serve re-hashes them. Blocking: call from a thread.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cachesvc.digest import HEX, Digest, compare
from cachesvc.errors import DigestMismatch
from cachesvc.fsutil import remove_tree
from cachesvc.store.blob import file_sha256
from cachesvc.store.index import Entry, Index

log = logging.getLogger(__name__)

LAYOUT = ("blobs", "blobs/sha256", "tmp")


@dataclass
class Scan:
    """What :func:`scan_blobs` found: rows to keep, files to re-hash, counts."""

    rows: dict[str, Entry] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    dropped_rows: list[str] = field(default_factory=list)
    report: Counter[str] = field(default_factory=Counter)


@dataclass
class Recovered:
    """The entries a store may load, which of them were hashed, and what was wrong."""

    rows: dict[str, Entry]
    verified: set[str]
    report: dict[str, int]


REPORT_KEYS = ("temp_removed", "rows_dropped", "adopted", "corrupt_removed", "junk_removed")


def recover(root: Path, index: Index, rows: dict[str, Entry], now: float) -> Recovered:
    """Steps 2 and 4 of the module docstring on the store at ``root`` (the
    layout and the index are set right before): removals and index repairs,
    counted."""
    swept = sweep_tmp(root / "tmp")
    scan = scan_blobs(root / "blobs" / "sha256", rows)
    for key in scan.dropped_rows:
        index.delete(key)
    adopted = adopt_orphans(root / "blobs" / "sha256", scan, now)
    index.put_many({key: scan.rows[key] for key in adopted})
    scan.report["temp_removed"] = swept
    scan.report["adopted"] = len(adopted)
    return Recovered(scan.rows, adopted, {key: scan.report[key] for key in REPORT_KEYS})


def prepare_layout(root: Path) -> int:
    """Make the store's directories real directories; return how many had to be
    replaced. Raises OSError only if one cannot be created (e.g. a read-only disk)."""
    replaced = 0
    for name in LAYOUT:
        path = root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            log.error("store %s: cannot stat %s (%s): replacing it", root, name, exc)
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            continue
        if st is not None:
            log.error("store %s: %s is not a directory: removing it", root, name)
            remove_tree(path)
            replaced += 1
        path.mkdir()  # an OSError here names the path; the runner prints it as one line
    return replaced


def sweep_tmp(tmp: Path) -> int:
    """Remove everything under ``tmp`` (interrupted ingests); return how many
    top-level entries there were."""
    names = _names(tmp)
    for name in names:
        remove_tree(tmp / name)
    return len(names)


def scan_blobs(blobs: Path, rows: dict[str, Entry]) -> Scan:
    """Sort ``blobs`` against the index ``rows``; remove what cannot be a
    blob. Reads no file's bytes."""
    scan = Scan()
    for name in _names(blobs):
        kind = _classify(blobs / name, rows.get(name))
        if kind == "kept":
            scan.rows[name] = rows[name]
        elif kind == "orphan":
            scan.orphans.append(name)
        else:
            scan.report[kind] += 1
            remove_tree(blobs / name)
    scan.dropped_rows = [key for key in rows if key not in scan.rows]
    scan.report["rows_dropped"] += len(scan.dropped_rows)
    return scan


def adopt_orphans(blobs: Path, scan: Scan, now: float) -> set[str]:
    """Re-hash files without a row: those that match their name join
    ``scan.rows`` (and count as verified), the rest are removed as corrupt.
    Returns the names adopted."""
    adopted: set[str] = set()
    for name in scan.orphans:
        try:
            sha256, size = file_sha256(blobs / name)
            compare(Digest(name), sha256, "adopt")
        except (OSError, DigestMismatch) as exc:
            log.error("store: removing %s: %s", blobs / name, exc)
        else:
            adopted.add(name)
            scan.rows[name] = Entry(size, now)
            continue
        scan.report["corrupt_removed"] += 1
        remove_tree(blobs / name)
    return adopted


def _classify(path: Path, row: Entry | None) -> str:
    """One name under ``blobs/sha256``: kept, orphan, junk_removed or corrupt_removed."""
    if not HEX.fullmatch(path.name):
        log.warning("store: removing %s: not named by a sha256 digest", path)
        return "junk_removed"
    try:
        st = os.lstat(path)
    except OSError as exc:
        log.error("store: removing %s: cannot stat it: %s", path, exc)
        return "corrupt_removed"
    if not stat.S_ISREG(st.st_mode):
        log.warning("store: removing %s: not a regular file (mode %o)", path, st.st_mode)
        return "junk_removed"
    if row is None:
        return "orphan"
    if st.st_size != row.size:
        log.error("store: removing %s: %d bytes, its index row says %d", path, st.st_size, row.size)
        return "corrupt_removed"
    return "kept"


def _names(directory: Path) -> list[str]:
    """Entry names of a directory we own; empty (and logged) if it cannot be read."""
    try:
        return os.listdir(directory)
    except OSError as exc:
        log.error("store: cannot list %s: %s", directory, exc)
        return []

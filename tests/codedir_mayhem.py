"""A code dir as a crash, an operator or another program can leave it, and a
snapshot of what lies outside it (which nothing may touch)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cachesvc.fsutil import remove_tree
from tests.trees import deep_tree


def fake_hex(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def manifest_for(hex_: str) -> str:
    """A manifest that would be valid for ``hex_`` (were its tree real)."""
    body = {"digest": f"sha256:{hex_}", "path": "/x", "files": 1, "bytes": 1, "layers": ["tar"]}
    return json.dumps(body)


@dataclass
class Mayhem:
    """What was planted: names that must go, names that must stay."""

    doomed: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)

    def tree(self, code: Path, label: str, manifest: str | None, mode: int = 0o755) -> str:
        hex_ = fake_hex(label)
        (code / hex_).mkdir()
        (code / hex_ / "f").write_text("x")
        os.chmod(code / hex_, mode)
        if manifest is not None:
            (code / f"{hex_}.json").write_text(manifest)
        self.doomed |= {hex_, f"{hex_}.json"} if manifest is not None else {hex_}
        return hex_


@contextlib.contextmanager
def planted(code: Path, outside: Path) -> Iterator[Mayhem]:
    """:func:`plant`, then remove both trees whatever happened: a tree past
    PATH_MAX left in pytest's temp dirs would break the next run's clean-up
    (``shutil.rmtree`` recurses), for every user of this machine."""
    try:
        yield plant(code, outside)
    finally:
        remove_tree(code)
        remove_tree(outside)


def plant(code: Path, outside: Path) -> Mayhem:
    """Fill ``code`` with every kind of leftover; ``outside`` holds link targets."""
    m = Mayhem()
    victim = outside / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("outside: never touched")
    (outside / "lookalike.json").write_text(manifest_for(fake_hex("manifest link")))

    deep_tree(code / ".tmp-crashed-deep", 2000, name="y" * 200)  # far past PATH_MAX
    (code / ".tmp-locked").mkdir()
    (code / ".tmp-locked" / "inner").mkdir()
    (code / ".tmp-locked" / "inner" / "f").write_text("x")
    os.chmod(code / ".tmp-locked" / "inner", 0)
    os.chmod(code / ".tmp-locked", 0)
    (code / ".tmp-manifest.json").write_text("{")
    m.doomed |= {".tmp-crashed-deep", ".tmp-locked", ".tmp-manifest.json"}

    m.tree(code, "no manifest", None)
    m.tree(code, "garbage manifest", "{not json")
    m.tree(code, "truncated manifest", manifest_for(fake_hex("truncated manifest"))[:40])
    m.tree(code, "manifest of another digest", manifest_for(fake_hex("someone else")))
    m.tree(code, "manifest nested too deep", "[" * 30_000 + "]" * 30_000)
    m.tree(code, "mode 000 tree", manifest_for(fake_hex("mode 000 tree")), mode=0)
    big = m.tree(code, "huge manifest", manifest_for(fake_hex("huge manifest")))
    with open(code / f"{big}.json", "a") as out:
        out.write(" " * (1 << 20))
    unreadable = m.tree(code, "mode 000 manifest", "{")
    os.chmod(code / f"{unreadable}.json", 0)

    hex_ = m.tree(code, "manifest is a dir", None)
    (code / f"{hex_}.json").mkdir()
    hex_ = m.tree(code, "manifest is a fifo", None)
    os.mkfifo(code / f"{hex_}.json")
    hex_ = m.tree(code, "manifest link", None)
    (code / f"{hex_}.json").symlink_to(outside / "lookalike.json")
    m.doomed |= {f"{h}.json" for h in (fake_hex(x) for x in ("manifest is a dir",
                 "manifest is a fifo", "manifest link"))}  # fmt: skip

    link = fake_hex("tree link")
    (code / link).symlink_to(victim, target_is_directory=True)
    (code / f"{link}.json").write_text(manifest_for(link))
    dangling = fake_hex("dangling link")
    (code / dangling).symlink_to(outside / "nowhere")
    plain = fake_hex("a file")
    (code / plain).write_text("not a tree")
    orphan = fake_hex("orphan manifest")
    (code / f"{orphan}.json").write_text(manifest_for(orphan))
    m.doomed |= {link, f"{link}.json", dangling, plain, f"{orphan}.json"}

    for name in ("README.operator", "A" * 64, f"{fake_hex('x')}.tar"):  # not names of ours
        (code / name).write_text("someone else's")
    m.kept |= {"README.operator", "A" * 64, f"{fake_hex('x')}.tar"}
    return m


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``root`` (links not followed): mode, size, and bytes of files."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            info = os.lstat(path)
            data = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size, data)
    return found

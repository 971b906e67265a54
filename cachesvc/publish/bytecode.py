"""Publisher transform: a package with bytecode inside, for named runtimes.

Public API::

    add_bytecode(src, dst, runtimes, jobs=None) -> BytecodeReport   # blocking
    with_bytecode(path, tmp, pythons) -> Path                       # for ``publish --bytecode``

A plain zip or tar is extracted (by :func:`cachesvc.unpack.extract.extract`,
with its refusals) into a temp dir; its ``.py`` files are compiled by each
runtime's own interpreter, confined (:mod:`cachesvc.unpack.bytecode`: unchecked-hash
pycs, hostile sources skipped), on every core; the pycs are appended to a copy
of the package as ``<dir>/__pycache__/<name>.<cache tag>.pyc`` members. The
package's own members are kept byte for byte; the new digest covers the pycs.
Sources that already have a pyc for a runtime are left alone.

Guarantees: ``dst`` is written only when at least one pyc was made (else the
report says ``kept`` False and ``dst`` does not exist); nothing of the package
is imported or run here. A layered package is refused (add layers after:
``--compress``, ``--repack``). This module does not upload.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cachesvc.errors import UnsupportedFormat
from cachesvc.unpack.bytecode import CompileBudget, CompileReport, Runtime, compile_files
from cachesvc.unpack.codec import Limits, MiB, detect_layers
from cachesvc.unpack.extract import extract
from cachesvc.unpack.hostcompile import plan

PUBLISH_LIMITS = Limits(max_package_size=1 << 62, max_unpacked_size=1 << 40, max_files=10**6)
PUBLISH_BUDGET = CompileBudget(timeout=3600.0, nice=0)
MEMBER_TIME = (2024, 1, 1, 0, 0, 0)
"""The time of every pyc member: unchecked-hash pycs ignore mtimes; a fixed one
keeps the package reproducible."""


@dataclass(frozen=True)
class BytecodeReport:
    """What ``--bytecode`` made and what it cost."""

    runtimes: tuple[str, ...]
    compiled: int
    skipped: int
    size_before: int
    size_after: int
    pyc_bytes: int
    seconds: float
    first_skip: str = ""

    @property
    def kept(self) -> bool:
        return self.compiled > 0

    def describe(self) -> str:
        if not self.kept:
            return f"bytecode ({', '.join(self.runtimes)}): no module compiled, package unchanged"
        growth = self.size_after / max(self.size_before, 1) - 1
        skips = f" ({self.first_skip}, ...)" if self.first_skip else ""
        return (
            f"bytecode ({', '.join(self.runtimes)}): {self.compiled} modules compiled, "
            f"{self.skipped} skipped{skips}; package {self.size_before / MiB:.1f} -> "
            f"{self.size_after / MiB:.1f} MiB ({growth:+.0%}), +{self.pyc_bytes / MiB:.1f} MiB "
            f"unpacked; {self.seconds:.1f} s"
        )


def with_bytecode(path: Path, tmp: Path, pythons: list[str]) -> Path:
    """``publish --bytecode``: the package with pycs for each interpreter (a name on
    PATH or a path), or ``path`` itself when nothing compiled; stderr says what it cost."""
    runtimes = asyncio.run(_probe_all(pythons))
    out = tmp / f"bytecode{''.join(path.suffixes[-1:]) or '.pkg'}"
    report = add_bytecode(path, out, runtimes)
    print(report.describe(), file=sys.stderr)
    return out if report.kept else path


async def _probe_all(pythons: list[str]) -> list[Runtime]:
    found = []
    for python in pythons:
        where = shutil.which(python)
        if where is None:
            raise ValueError(f"--bytecode {python}: no such interpreter")
        found.append(await Runtime.probe(Path(where).name, Path(where)))
    return found


def add_bytecode(
    src: Path, dst: Path, runtimes: list[Runtime], jobs: int | None = None
) -> BytecodeReport:
    """Write ``dst``: ``src`` (a plain zip or tar) plus pycs for ``runtimes``. Blocking."""
    start = time.perf_counter()
    layers = detect_layers(src, PUBLISH_LIMITS)
    if layers not in (["zip"], ["tar"]):
        raise UnsupportedFormat(
            f"--bytecode takes a plain zip or tar, not {','.join(layers)}: add layers after it"
        )
    with tempfile.TemporaryDirectory(prefix="cachesvc-bytecode-") as tmp:
        root = Path(tmp)
        extract(src, root, PUBLISH_LIMITS)
        reports = asyncio.run(_compile(root, runtimes, jobs or os.cpu_count() or 1))
        pycs = sorted(
            {rt.pyc_of(rel) for rt, _r, files in reports for rel in files}
            & {rel for rel in _files_of(root) if rel.endswith(".pyc")}
        )
        compiled = sum(r.compiled for _rt, r, _f in reports)
        if compiled:
            _append(src, dst, root, pycs, layers[0])
        skips = [f"{rel}: {why}" for _rt, r, _f in reports for rel, why in r.skips]
        return BytecodeReport(
            runtimes=tuple(rt.cache_tag for rt in runtimes),
            compiled=compiled,
            skipped=sum(r.skipped for _rt, r, _f in reports),
            size_before=src.stat().st_size,
            size_after=dst.stat().st_size if compiled else src.stat().st_size,
            pyc_bytes=sum((root / rel).stat().st_size for rel in pycs),
            seconds=time.perf_counter() - start,
            first_skip=skips[0][:200] if skips else "",
        )


async def _compile(
    root: Path, runtimes: list[Runtime], jobs: int
) -> list[tuple[Runtime, CompileReport, list[str]]]:
    """Each runtime's report and the sources it was given (those without its
    pyc), dealt to ``jobs`` children at once."""
    (phase,) = plan(root, runtimes, ())
    results = []
    for rt in runtimes:
        files = phase[rt.name]
        chunks = [files[i::jobs] for i in range(jobs) if files[i::jobs]]
        parts = await asyncio.gather(*(compile_files(rt, root, c, PUBLISH_BUDGET) for c in chunks))
        report = CompileReport()
        for part in parts:
            report.add(part)
        results.append((rt, report, files))
    return results


def _files_of(root: Path) -> list[str]:
    return [
        os.path.relpath(os.path.join(dirpath, name), root)
        for dirpath, _dirs, names in os.walk(root)
        for name in names
    ]


def _append(src: Path, dst: Path, root: Path, pycs: list[str], kind: str) -> None:
    """A copy of ``src`` with ``pycs`` appended; written beside ``dst``, then renamed."""
    part = dst.with_name(f".{dst.name}.part")
    shutil.copyfile(src, part)
    try:
        if kind == "zip":
            with zipfile.ZipFile(part, "a", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                for rel in pycs:
                    zf.writestr(_zip_member(rel), (root / rel).read_bytes())
        else:
            with tarfile.open(part, "a") as tf:
                for rel in pycs:
                    with (root / rel).open("rb") as pyc:
                        tf.addfile(_tar_member(rel, root), pyc)
        part.replace(dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _zip_member(rel: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(rel, date_time=MEMBER_TIME)
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _tar_member(rel: str, root: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.size = (root / rel).stat().st_size
    info.mode = 0o644
    info.mtime = calendar.timegm((*MEMBER_TIME, 0, 0, 0))
    return info

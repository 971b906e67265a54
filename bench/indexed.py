"""Size of the indexed form against the plain repack, on real packages.

Command (from the repository root; packages from ``bench/corpus.py``)::

    .venv/bin/python bench/indexed.py bench/out/corpus/*.zip [--level 19]

For each zip: its size, the plain repack (one zstd stream over the tar, long
matching: :func:`cachesvc.publish.repack.repack`), the indexed repack (a frame
per file or 512 KiB chunk, plus its index: :func:`repack_indexed`), the
overhead of the indexed form over the plain one, the index's own size, and
the seconds each took. Prints a Markdown table and writes it to
``bench/out/indexed.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cachesvc.publish.indexed import repack_indexed  # noqa: E402
from cachesvc.publish.repack import repack  # noqa: E402


def row(package: Path, level: int) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-indexed-") as tmp:
        started = time.perf_counter()
        plain = repack(package, Path(tmp) / "plain.tar.zst", level).tar_zstd_size
        plain_s = time.perf_counter() - started
        report = repack_indexed(package, Path(tmp) / "indexed.tar.zst", level)
    over = 100 * (report.size / plain - 1)
    return (f"| {package.name} | {report.files:,} | {report.bytes / 2**20:.1f} MiB "
            f"| {report.src_size:,} | {plain:,} | {report.size:,} | **+{over:.1f} %** "
            f"| {report.index.size:,} | {plain_s:.1f} / {report.seconds:.1f} s |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("zips", nargs="+", type=Path)
    parser.add_argument("--level", type=int, default=19)
    args = parser.parse_args()
    lines = [
        f"zstd level {args.level}; sizes in bytes",
        "",
        "| package | files | unpacked | zip | tar.zst | indexed | overhead | index | time "
        "(plain / indexed) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for package in args.zips:
        lines.append(row(package, args.level))
        print(lines[-1], flush=True)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "indexed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

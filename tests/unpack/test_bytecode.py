"""Compiling a tree for a runtime: real interpreters, real hostile sources."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachesvc.unpack.bytecode import CompileBudget, CompileFailed, Runtime, compile_files

GOOD = {
    "a.py": b"X = 1\n",
    "pkg/__init__.py": b"from . import b\n",
    "pkg/b.py": b"def f():\n    return 'b'\n",
}
SLOW_SOURCE = "".join(
    f"def f{i}(a, b):\n    return [a + b * {i} for _ in range(3)]\n" for i in range(60_000)
)  # 3.6 MiB: seconds of compiling, well under max_source
OTHER_PYTHON = Path("/usr/bin/python3.11")


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


async def this_runtime() -> Runtime:
    return await Runtime.probe("python3.11", Path(sys.executable))


def pyc_header(path: Path) -> tuple[bytes, int, bytes]:
    data = path.read_bytes()
    return data[:4], int.from_bytes(data[4:8], "little"), data[8:16]


async def test_a_runtime_reports_its_own_cache_tag_and_magic_number() -> None:
    runtime = await this_runtime()
    assert runtime.cache_tag == sys.implementation.cache_tag
    assert runtime.magic == importlib.util.MAGIC_NUMBER
    assert runtime.pyc_of("pkg/b.py") == f"pkg/__pycache__/b.{runtime.cache_tag}.pyc"
    assert runtime.pyc_of("a.py") == f"__pycache__/a.{runtime.cache_tag}.pyc"


async def test_a_runtime_that_cannot_run_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(CompileFailed, match="no-such-python"):
        await Runtime.probe("python9", tmp_path / "no-such-python")


async def test_hostile_sources_are_skipped_within_the_budget_and_the_rest_is_compiled(
    tmp_path: Path,
) -> None:
    hostile = {
        "nested.py": b"x = " + b"(" * 10**5 + b")" * 10**5 + b"\n",
        "unary.py": b"x = " + b"-" * 10**5 + b"1\n",  # the parser runs out of stack
        "chain.py": b"x = 1" + b" + 1" * 10**5 + b"\n",  # the compiler recurses
        "syntax.py": b"def broken(:\n",
        "slow.py": SLOW_SOURCE.encode(),
    }
    write_tree(tmp_path, {**GOOD, **hostile})
    with (tmp_path / "literal.py").open("wb") as out:  # 200 MB: skipped unread
        out.write(b"x = '")
        out.truncate(200 * 10**6)
    files = ["nested.py", "a.py", "syntax.py", "literal.py", "unary.py", "chain.py", "slow.py"]
    files.append("pkg/__init__.py")
    files.append("pkg/b.py")
    runtime = await this_runtime()
    budget = CompileBudget(per_file=0.5, timeout=60, memory=512 * 2**20)
    start = time.monotonic()
    report = await compile_files(runtime, tmp_path, files, budget)
    assert time.monotonic() - start < 30
    assert report.compiled == len(GOOD)
    skipped = dict(report.skips)
    assert set(skipped) == {*hostile, "literal.py"}
    assert skipped["unary.py"] == "MemoryError" and skipped["chain.py"] == "RecursionError"
    assert "SyntaxError" in skipped["syntax.py"] and "nested" in skipped["nested.py"]
    assert "over" in skipped["literal.py"] and "took over 0.5 s" in skipped["slow.py"]
    assert report.children == 2  # the stuck compile was killed; a new child went on
    for rel in GOOD:
        magic, flags, _hash = pyc_header(tmp_path / runtime.pyc_of(rel))
        assert magic == runtime.magic and flags == 0b01  # hash-based, unchecked
    for rel in hostile:
        assert not (tmp_path / runtime.pyc_of(rel)).exists()


@pytest.mark.skipif(not OTHER_PYTHON.exists(), reason="no /usr/bin/python3.11 on this host")
async def test_the_pycs_are_made_by_the_runtime_named_and_it_loads_them(tmp_path: Path) -> None:
    write_tree(tmp_path, GOOD)
    runtime = await Runtime.probe("system", OTHER_PYTHON)
    report = await compile_files(runtime, tmp_path, sorted(GOOD), CompileBudget())
    assert report.compiled == 3 and report.skipped == 0
    # Unchecked-hash pycs are used as they are: changing a source (which never
    # happens in an immutable tree) shows the runtime ran the pyc, not the source.
    (tmp_path / "a.py").write_bytes(b"X = 2\n")
    probe = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import a, pkg; print(a.X)"
    out = subprocess.run(
        [str(OTHER_PYTHON), "-I", "-B", "-c", probe], capture_output=True, check=True
    )
    assert out.stdout.strip() == b"1"


async def test_a_job_over_its_budget_skips_what_it_did_not_reach(tmp_path: Path) -> None:
    write_tree(tmp_path, {"slow.py": SLOW_SOURCE.encode(), **GOOD})
    runtime = await this_runtime()
    files = ["slow.py", *sorted(GOOD)]
    report = await compile_files(runtime, tmp_path, files, CompileBudget(timeout=0.5))
    assert report.compiled == 0 and report.skipped == len(files)
    assert all("over the budget" in why for _rel, why in report.skips)


async def test_a_job_stops_compiling_past_its_limit_on_bytecode_bytes(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"m{i}.py": f"X = {i!r}\n".encode() * 200 for i in range(6)})
    runtime = await this_runtime()
    files = [f"m{i}.py" for i in range(6)]
    report = await compile_files(runtime, tmp_path, files, CompileBudget(max_pyc_bytes=1))
    assert report.compiled == 1 and report.pyc_bytes > 1  # the first pyc passes the limit
    assert [rel for rel, _why in report.skips] == files[1:]
    assert all(why == "over the limit on bytecode bytes" for _rel, why in report.skips)

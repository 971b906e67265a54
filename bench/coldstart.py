"""Time to a function's first answer: starts without bytecode, with host-made and with
published bytecode.

Command (from the repository root; builds the start corpus of ``bench/corpus.py``
first if needed)::

    .venv/bin/python bench/coldstart.py [--reps 3] [--runtime /usr/bin/python3.11]
        [--package pandas-report] [--mode none --mode host]

Real processes: a ``cachesvc agent`` (file:// origin, no peers) with an empty
cache and code dir for every repetition (an empty host), and the function
started as a new ``RUNTIME -s -B`` process (the tree is read-only to it, so it
writes no bytecode) that imports ``handler`` from the unpacked tree and calls
it once. For each package of the start corpus and each mode, per repetition:

* **unpack**: ``POST /pkg/{d}/unpack`` on an empty host (with the start's
  modules as the hint);
* **first**: the first start on that host, once the unpack answered;
* **second**: the second instance on that host (in mode ``host``, once the
  agent's background compile has finished: ``GET /pkg/{d}/bytecode``);
* **warm**: three more starts, their median.

Modes (add one by adding a :class:`Mode` to :data:`MODES`): ``none`` (the
package as built, an agent without runtimes: today), ``host`` (the same
package, the agent with ``--runtime``), ``published`` (the package published
with ``--bytecode RUNTIME``). Prints medians in milliseconds, ratios against
``none`` from the same run (wall, and CPU of the start process, which load
on a shared machine disturbs less), the goals, the host compile's time and
what ``--bytecode`` cost (size, seconds). Writes ``bench/out/coldstart.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import corpus  # noqa: E402
from bench.procs import publish_report  # noqa: E402
from cachesvc.digest import Digest  # noqa: E402
from cachesvc.publish.bytecode import BytecodeReport, add_bytecode  # noqa: E402
from cachesvc.publish.upload import publish_blob  # noqa: E402
from cachesvc.unpack.bytecode import Runtime  # noqa: E402
from cachesvc.upstream.origin import make_origin  # noqa: E402
from loadtest.procs import Child, free_port, spawn, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
WARM_STARTS = 3
COMPILE_WAIT = 600.0

START = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
import handler
handler.handler(json.loads(sys.argv[2]), None)
if len(sys.argv) > 3:
    tree = sys.argv[1] + "/"
    files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
    print(sum(os.path.getsize(f) for f in files if f.startswith(tree) and f.endswith(".py")))
"""

EVENTS: dict[str, Any] = {
    "pydantic-api": {"id": 1, "items": ["a", "b"], "total": 2.5},
    "pandas-report": {"rows": [{"a": 1, "b": 2.0}, {"a": 3, "b": 4.5}]},
    "sklearn-model": {"x": [[0.0], [1.0], [2.0], [3.0]], "y": [0, 0, 1, 1]},
}
HINTS = {
    "pydantic-api": "handler,pydantic,pydantic_core",
    "pandas-report": "handler,pandas,numpy",
    "sklearn-model": "handler,sklearn,numpy,scipy",
}


@dataclass(frozen=True)
class Mode:
    """How a host gets its bytecode: which package it serves, which agent flags."""

    name: str
    published: bool = False
    agent_flags: Callable[[Path], list[str]] = lambda _runtime: []
    waits_for_compile: bool = False


MODES = [
    Mode("none"),
    Mode("host", agent_flags=lambda rt: ["--runtime", f"python3.11={rt}"], waits_for_compile=True),
    Mode("published", published=True),
]


@dataclass
class Host:
    """The origin every repetition's empty host reads from, and where it lives."""

    origin: object
    origin_url: str
    runtime: Path
    work: Path


@dataclass(frozen=True)
class Start:
    wall: float
    cpu: float


@dataclass
class Figures:
    """Per repetition: the unpack, the first start, the second, the warm median, the
    host compile's seconds."""

    unpack: list[float] = field(default_factory=list)
    first: list[Start] = field(default_factory=list)
    second: list[Start] = field(default_factory=list)
    warm: list[Start] = field(default_factory=list)
    compile: list[float] = field(default_factory=list)

    def median(self, name: str, what: str = "wall") -> float:
        values = [getattr(start, what) for start in getattr(self, name)]
        return statistics.median(values) if values else float("nan")


def start_function(runtime: Path, tree: Path, package: str, measure: bool = False) -> Start:
    """One start, from exec to the handler's return: wall and CPU seconds (user + system,
    from ``RUSAGE_CHILDREN``: nothing else of ours ends meanwhile). Blocking."""
    argv = [str(runtime), "-s", "-B", "-c", START, str(tree), json.dumps(EVENTS[package])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    done = subprocess.run([*argv, *(["measure"] if measure else [])], capture_output=True, cwd="/")
    wall = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"start of {package} failed: {done.stderr.decode()[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Start(float(done.stdout) if measure else wall, cpu)


async def start_agent(work: Path, origin: str, mode: Mode, runtime: Path) -> tuple[Child, str]:
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "cachesvc", "agent", "--listen", url.removeprefix("http://")]
    argv += ["--cache-dir", str(work / "cache"), "--cache-size", "8GiB", "--origin", origin]
    argv += ["--code-dir", str(work / "code"), "--log-level", "WARNING", "--peers", ""]
    argv += mode.agent_flags(runtime)
    env = {"PYTHONPATH": str(ROOT)}
    child = await spawn("agent", argv, work.parent / f"agent-{mode.name}.log", env=env)
    await wait_ready(child, url + "/readyz")
    return child, url


async def request(method: str, url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, url) as r:
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{method} {url}: {r.status} {body}")
        return body


async def compiled(agent: str, digest: Digest) -> float:
    """Wait for the agent's compile of ``digest`` to finish; its seconds."""
    deadline = time.monotonic() + COMPILE_WAIT
    while time.monotonic() < deadline:
        state = await request("GET", f"{agent}/pkg/{digest}/bytecode")
        if state["state"] not in ("queued", "compiling"):
            return float(sum(rt["seconds"] for rt in state["runtimes"].values()))
        await asyncio.sleep(0.1)  # a benchmark's poll, not a test's synchronisation
    raise RuntimeError(f"the compile of {digest.short} did not finish in {COMPILE_WAIT} s")


async def one_rep(name: str, digest: Digest, mode: Mode, host: Host, figures: Figures) -> None:
    work = host.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    agent, url = await start_agent(work, host.origin_url, mode, host.runtime)
    try:
        begin = time.perf_counter()
        body = await request("POST", f"{url}/pkg/{digest}/unpack?modules={HINTS[name]}")
        unpack = time.perf_counter() - begin
        tree = Path(body["path"])
        figures.unpack.append(unpack)
        figures.first.append(start_function(host.runtime, tree, name))
        figures.compile.append(await compiled(url, digest) if mode.waits_for_compile else 0.0)
        figures.second.append(start_function(host.runtime, tree, name))
        warm = [start_function(host.runtime, tree, name) for _ in range(WARM_STARTS)]
        wall, cpu = (statistics.median(x) for x in ([w.wall for w in warm], [w.cpu for w in warm]))
        figures.warm.append(Start(wall, cpu))
    finally:
        await agent.stop()
        shutil.rmtree(work, ignore_errors=True)


STAGES = ("first", "second", "warm")


def report(
    results: dict[str, dict[str, Figures]],
    costs: dict[str, BytecodeReport],
    imported: dict[str, float],
    args: argparse.Namespace,
) -> list[str]:
    lines = [
        f"Runtime {args.runtime}; medians of {args.reps} repetitions; modes interleaved "
        "within each repetition. Starts: wall ms (CPU ms of the start process, user + "
        "system); ratios against mode none of the same run, wall / CPU.",
        "unpack = POST unpack on an empty host; first = the first start after it; second = "
        "the next instance (mode host: once the agent's compile finished); warm = median of "
        f"{WARM_STARTS} more.",
        "",
        "| package | imported .py | mode | unpack | first | second | warm | first / none | "
        "second / none | warm / none |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_mode in results.items():
        base = by_mode.get("none")
        for mode, f in by_mode.items():
            row = [name, f"{imported.get(name, 0) / MiB:.1f} MiB", mode]
            row.append(f"{statistics.median(f.unpack) * 1000:,.0f}")
            row += [f"{f.median(k) * 1000:,.0f} ({f.median(k, 'cpu') * 1000:,.0f})"
                    for k in STAGES]  # fmt: skip
            row += [f"{ratio(f, base, k):.2f} / {ratio(f, base, k, 'cpu'):.2f}" if base else "-"
                    for k in STAGES]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| package | host compile (s) | --bytecode: package | unpacked | seconds |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, by_mode in results.items():
        host = by_mode.get("host")
        row = [name, f"{statistics.median(host.compile):.1f}" if host else "-"]
        cost = costs.get(name)
        if cost is None:
            row += ["-", "-", "-"]
        else:
            row.append(f"{cost.size_before / MiB:.1f} -> {cost.size_after / MiB:.1f} MiB")
            row += [f"+{cost.pyc_bytes / MiB:.1f} MiB", f"{cost.seconds:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *goals(results, imported)]
    return lines


def ratio(f: Figures, base: Figures, stage: str, what: str = "wall") -> float:
    return f.median(stage, what) / base.median(stage, what)


GOALS = {"warm": 0.5, "second": 0.55}


def goals(results: dict[str, dict[str, Figures]], imported: dict[str, float]) -> list[str]:
    """Goals: warm <= 0.5 (any bytecode), second instance <= 0.55 (host-made), the first
    start within noise of today's; on packages importing over 1 MiB of Python source."""
    out = ["Goals (packages importing over 1 MiB of Python source), wall / CPU, judged on wall:"]
    for name, by_mode in results.items():
        base = by_mode.get("none")
        if base is None or imported.get(name, 0) <= MiB:
            continue
        checks = []
        for mode, f in by_mode.items():
            for stage, goal in GOALS.items():
                if mode == "none" or (stage == "second" and mode != "host"):
                    continue
                wall, cpu = ratio(f, base, stage), ratio(f, base, stage, "cpu")
                verdict = "met" if wall <= goal else "MISSED"  # the goals are times
                checks.append(f"{mode} {stage} {wall:.2f} / {cpu:.2f} ({verdict} <= {goal})")
            if mode != "none":
                first = ratio(f, base, "first")
                checks.append(f"{mode} first start {first:.2f} (goal: 1 within noise)")
        out.append(f"- {name}: " + "; ".join(checks))
    return out


async def amain(args: argparse.Namespace) -> list[str]:
    packages = corpus.build(corpus.DEFAULT_OUT, corpus.START_PACKAGES)
    packages = [p for p in packages if not args.package or p.stem in args.package]
    modes = [m for m in MODES if not args.mode or m.name in args.mode]
    runtime = await Runtime.probe("python3.11", args.runtime)
    results: dict[str, dict[str, Figures]] = {}
    costs: dict[str, BytecodeReport] = {}
    imported: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cachesvc-coldstart-") as tmp:
        work = Path(tmp)
        (work / "origin").mkdir()
        host = Host(make_origin(f"file://{work / 'origin'}", None), f"file://{work / 'origin'}",
                    args.runtime, work / "host")  # fmt: skip
        try:
            for package in packages:
                name = package.stem
                if any(m.published for m in modes):
                    costs[name] = await asyncio.to_thread(
                        add_bytecode, package, work / f"{name}-bytecode.zip", [runtime]
                    )
                    print(f"  {name}: {costs[name].describe()}", flush=True)
                published = work / f"{name}-bytecode.zip"
                results[name] = await run_package(host, package, modes, args.reps, published)
                imported[name] = await imported_source(name, package, work, args.runtime)
        finally:
            await host.origin.close()  # type: ignore[attr-defined]
    return report(results, costs, imported, args)


async def run_package(
    host: Host, package: Path, modes: list[Mode], reps: int, published: Path
) -> dict[str, Figures]:
    """Every repetition runs every mode in turn, starting with the next one each time:
    load on the machine, and its drift, fall on all alike."""
    name = package.stem
    figures = {mode.name: Figures() for mode in modes}
    digests = {}
    for mode in modes:
        source = published if mode.published else package
        digests[mode.name], _size, _new = await publish_blob(host.origin, source)  # type: ignore[arg-type]
    for rep in range(reps):
        for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:  # rotated
            f = figures[mode.name]
            await one_rep(name, digests[mode.name], mode, host, f)
            print(f"  {name} {mode.name} rep {rep}: unpack {f.unpack[-1]:.3f} first "
                  f"{f.first[-1].wall:.3f} second "
                  f"{f.second[-1].wall:.3f} warm {f.warm[-1].wall:.3f} (cpu "
                  f"{f.warm[-1].cpu:.3f}) compile {f.compile[-1]:.1f}", flush=True)  # fmt: skip
    return figures


async def imported_source(name: str, package: Path, work: Path, runtime: Path) -> float:
    """Bytes of the package's own .py files a start imports (unpacked with unzip)."""
    tree = work / f"{name}-tree"
    await asyncio.to_thread(shutil.unpack_archive, package, tree, "zip")
    try:
        return start_function(runtime, tree, name, measure=True).wall
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    default = Path("/usr/bin/python3.11")
    parser.add_argument(
        "--runtime",
        type=Path,
        default=default if default.exists() else Path(sys.executable),
        help="the function runtime (default /usr/bin/python3.11, else this interpreter)",
    )
    parser.add_argument("--package", action="append", help="only these packages (stems)")
    parser.add_argument("--mode", action="append", help="only these modes")
    args = parser.parse_args()
    publish_report("coldstart", asyncio.run(amain(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

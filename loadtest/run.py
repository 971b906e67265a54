"""One load-test run: start the local stack, seed it, and run each scenario
against each target (origin directly, nginx, cachesvc) one after the other, so
they never share the two cores. Origin GETs and bytes are the proxy's counts
taken before and after each target's run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.report import RunInfo, write_report
from loadtest.scenarios import STOP_TIMEOUT_S, Scenario, scenarios
from loadtest.seed import seed
from loadtest.stack import BUCKET, LocalStack, Target, local_stack

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
TARGET_ORDER = ("origin", "nginx", "cachesvc")
WARM_MODE = {"origin": "none", "nginx": "get", "cachesvc": "api"}


@dataclass(frozen=True)
class TargetRun:
    """What one scenario did against one target."""

    scenario: str
    target: str
    samples: Path  # one CSV row per fetch (locustfile --samples)
    csv_prefix: Path  # locust's own --csv files
    origin_gets: int
    origin_bytes: int
    exit_code: int
    wall_s: float


def locust_argv(sc: Scenario, target: Target, manifest: Path, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    argv += ["--host", target.hosts[0], "--hosts", ",".join(target.hosts)]
    argv += ["--path-template", target.path_template, "--packages", str(manifest)]
    argv += ["--samples", str(out / f"{target.name}_samples.csv")]
    argv += ["--csv", str(out / target.name), "--only-summary", "--loglevel", "WARNING"]
    argv += ["--stop-timeout", str(STOP_TIMEOUT_S), "--warm", WARM_MODE[target.name]]
    return argv + list(sc.args) + [sc.user]


async def run_locust(argv: list[str], env: dict[str, str], log: Path, limit_s: float) -> int:
    """Run locust to its end, or kill it after ``limit_s``; returns its exit code."""
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env
        )
        try:
            return await asyncio.wait_for(proc.wait(), limit_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -9


async def run_target(
    stack: LocalStack, sc: Scenario, target: Target, manifest: Path, out: Path
) -> TargetRun:
    gets, nbytes = stack.proxy.blob_gets(), stack.proxy.blob_bytes()
    env = {**os.environ, "CACHESVC_TOKEN": stack.token}
    t0 = time.monotonic()
    code = await run_locust(
        locust_argv(sc, target, manifest, out), env, out / f"{target.name}_locust.log", sc.limit_s
    )
    return TargetRun(
        sc.name,
        target.name,
        out / f"{target.name}_samples.csv",
        out / target.name,
        stack.proxy.blob_gets() - gets,
        stack.proxy.blob_bytes() - nbytes,
        code,
        time.monotonic() - t0,
    )


async def run(
    names: list[str],
    quick: bool,
    run_dir: Path,
    targets: tuple[str, ...] = TARGET_ORDER,
    origin: str = "moto",
) -> Path:
    """Run ``names`` against ``targets`` over the S3 store ``origin`` (moto or
    seaweedfs); returns the path of report.md."""
    chosen = [scenarios(quick)[n] for n in names]
    run_dir.mkdir(parents=True, exist_ok=True)
    results: list[TargetRun] = []
    async with local_stack(run_dir / "logs", nginx="nginx" in targets, origin=origin) as stack:
        plan = {sc.name: sc.sizes for sc in chosen}
        manifest_data = await seed(BUCKET, stack.store_url, plan, run_dir)
        manifest = run_dir / "packages.json"
        manifest.write_text(json.dumps(manifest_data, indent=1))
        for sc in chosen:
            out = run_dir / sc.name
            out.mkdir(exist_ok=True)
            for name in targets:
                print(f"loadtest: {sc.name} against {name}", file=sys.stderr, flush=True)
                results.append(await run_target(stack, sc, stack.targets()[name], manifest, out))
        shown = {t.name: (t.hosts, t.path_template) for t in stack.targets().values()}
        info = RunInfo(quick, origin, {name: shown[name] for name in targets})
    return write_report(run_dir, chosen, results, info)

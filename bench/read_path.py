"""The read path against its baselines: L1 hits vs nginx, a cold storm vs warm, agent RSS.

Command (from the repository root; installs nginx, wrk and curl with apt-get
when missing, as root; without root or apt-get, a missing nginx or wrk leaves
out part 1 with the reason in the report, a missing curl stops the run)::

    .venv/bin/python bench/read_path.py [--quick] [--storms 3] [--origin moto|seaweedfs]

Everything runs on 127.0.0.1 in a temp dir as real processes, and is stopped
at the end (nginx with SIGQUIT). Prints, and writes ``bench/out/read_path.md``:

1. L1-hit throughput for 16 KiB, 1 MiB and 64 MiB packages: ``wrk -t2 -c32
   -d10s`` against the agent (package in L1) and against nginx with one worker
   and ``sendfile on`` serving the same bytes; median of 3 interleaved runs;
   ratio cachesvc/nginx (targets >= 1.0 at 1 and 64 MiB, >= 0.4 at 16 KiB, issue 12).
2. Cold storm: an S3 store as origin (``--origin``: moto, an in-memory mock,
   by default; ``seaweedfs``, a real store that checks signatures and keeps
   objects on disk), 3 peers + 2 agents; a fresh 64 MiB package; 100 GETs (50
   per agent) written at once by ``bench/getstorm.py``: origin GETs (from the
   store's own count: moto's request log, SeaweedFS's metrics; and from the
   services' metrics; target 1), TTFB and total p50/p99; then the same 100
   GETs all-warm (L1); ratio storm total p99 / warm total p99 (target <= 1.1)
   and storm TTFB p99 (target <= 0.2 s). Baseline: one client GETs the 64 MiB
   from the store directly.
3. Agent RSS (VmRSS every 100 ms) while one agent serves 100 concurrent 64 MiB
   L1 downloads (target < 300 MB), and during the storms.

``--quick`` runs wrk for 3 s once per cell and one storm: for trying changes,
not for reporting.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.getstorm import Result, storm  # noqa: E402
from bench.procs import Procs, cpu_seconds, free_port, rss_bytes, wait_http  # noqa: E402
from loadtest.seaweedfs import SeaweedFS  # noqa: E402
from loadtest.tools import ToolUnavailable, require  # noqa: E402

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CACHESVC = str(VENV_BIN / "cachesvc")
BUCKET = "bench-read-path"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CURL_TIMES = "%{time_starttransfer} %{time_total} %{http_code}"
SIZES = [("16 KiB", 16 * 1024), ("1 MiB", MiB), ("64 MiB", 64 * MiB)]
TARGETS_L1 = {"16 KiB": 0.4, "1 MiB": 1.0, "64 MiB": 1.0}
NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
    }}
}}
"""


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def service_argv(kind: str, port: int, cache: Path, *extra: str) -> list[str]:
    """``cachesvc agent|peer`` on 127.0.0.1:port with a 20 GiB store in ``cache``."""
    return [
        CACHESVC, kind, "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache),
        "--cache-size", "20GiB", "--log-level", "WARNING", "--shutdown-grace", "1", *extra,
    ]  # fmt: skip


def publish(path: Path, origin: str, *extra: str) -> str:
    out = subprocess.run(
        [CACHESVC, "publish", str(path), "--origin", origin, *extra],
        check=True, capture_output=True, text=True, timeout=120, env={**os.environ, **AWS_ENV},
    ).stdout  # fmt: skip
    match = re.search(r"sha256:([0-9a-f]{64})", out)
    if match is None:
        raise RuntimeError(f"publish printed no digest: {out!r}")
    return match[1]


def get_all(url: str) -> tuple[str, str]:
    """(X-Cache-Tier, sha256 hex) of a full GET."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as resp:
        while block := resp.read(MiB):
            h.update(block)
        return resp.headers.get("X-Cache-Tier", ""), h.hexdigest()


# -- 1. L1 hits against nginx ------------------------------------------------------


@dataclass
class WrkRun:
    rps: float  # completed responses per second
    mibps: float  # bytes read per second, partial responses included
    errors: str
    cpu_us: float = math.nan  # server CPU per completed request


_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def wrk(url: str, seconds: int, server_pid: int) -> WrkRun:
    cpu0 = cpu_seconds(server_pid)
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "--timeout", "30s", url],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(_wrk_line(r"Requests/sec:\s+([\d.]+)", out)[1])
    rate = _wrk_line(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", out)
    mibps = float(rate[1]) * _UNITS[rate[2]] / MiB
    errors = [line.strip() for line in out.splitlines() if "errors" in line or "Non-2xx" in line]
    cpu = cpu_seconds(server_pid) - cpu0
    return WrkRun(rps, mibps, "; ".join(errors), cpu / max(rps * seconds, 1) * 1e6)


def _wrk_line(pattern: str, out: str) -> re.Match[str]:
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"wrk printed no line matching {pattern!r}: {out!r}")
    return match


def bench_l1(work: Path, procs: Procs, reps: int, seconds: int) -> list[str]:
    www, origin = work / "nginx" / "www", work / "origin"
    www.mkdir(parents=True)
    (work / "nginx" / "tmp").mkdir()
    digests = {}
    for name, size in SIZES:
        path = www / f"{name.replace(' ', '')}.bin"
        path.write_bytes(os.urandom(size))
        digests[name] = publish(path, f"file://{origin}")
        path.rename(www / digests[name])
    for d in (work, work / "nginx", www, *www.iterdir()):
        d.chmod(0o755)  # nginx workers drop to an unprivileged user
    a_port, n_port = free_port(), free_port()
    argv = service_argv("agent", a_port, work / "l1-agent", "--origin", f"file://{origin}")
    pids = {"agent": procs.start("l1-agent", argv).pid}
    conf = work / "nginx" / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=work / "nginx", port=n_port))
    ndir = str(work / "nginx")
    nginx = ["nginx", "-p", ndir, "-c", str(conf), "-e", ndir + "/error.log"]
    pids["nginx"] = procs.start("nginx", nginx, stop_sig=signal.SIGQUIT).pid
    wait_http(f"http://127.0.0.1:{a_port}/readyz")
    wait_http(f"http://127.0.0.1:{n_port}/{digests['16 KiB']}")
    for name, hex_ in digests.items():
        for want in ("ORIGIN", "L1"):
            tier, got = get_all(f"http://127.0.0.1:{a_port}/pkg/sha256:{hex_}")
            assert (tier, got) == (want, hex_), f"{name}: {tier} {got}"
    urls = {
        name: {
            "agent": f"http://127.0.0.1:{a_port}/pkg/sha256:{digests[name]}",
            "nginx": f"http://127.0.0.1:{n_port}/{digests[name]}",
        }
        for name, _ in SIZES
    }
    return l1_table(urls, pids, reps, seconds)


def l1_table(
    urls: dict[str, dict[str, str]], pids: dict[str, int], reps: int, seconds: int
) -> list[str]:
    """wrk each URL ``reps`` times, agent and nginx alternating; medians and ratio.

    The ratio is of MiB/s (bytes wrk read, partial responses included): at
    64 MiB a 10 s run completes only a few rounds of 32 responses, so completed
    req/s is quantised; bytes are not. Server CPU per request (from
    /proc/PID/stat around each run) does not depend on what else the machine
    runs, so it is the figure to trust when the load average is high."""
    rows = [
        "| size | cachesvc req/s | cachesvc MiB/s | nginx req/s | nginx MiB/s | ratio (MiB/s) |"
        " target | server CPU µs/req (cachesvc / nginx) | runs, MiB/s (cachesvc / nginx) |"
        " load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in SIZES:
        runs: dict[str, list[WrkRun]] = {"agent": [], "nginx": []}
        loads = [os.getloadavg()[0]]
        for _ in range(reps):
            for who, url in urls[name].items():
                runs[who].append(wrk(url, seconds, pids[who]))
                r = runs[who][-1]
                print(f"  {name:>6} {who:5} {r.rps:9.1f} req/s {r.mibps:7.0f} MiB/s", flush=True)
            loads.append(os.getloadavg()[0])
        rps = {who: statistics.median(r.rps for r in rs) for who, rs in runs.items()}
        mib = {who: statistics.median(r.mibps for r in rs) for who, rs in runs.items()}
        ratio = mib["agent"] / mib["nginx"]
        mark = "ok" if ratio >= TARGETS_L1[name] else "**missed**"
        each = " / ".join(", ".join(f"{r.mibps:.0f}" for r in runs[w]) for w in ("agent", "nginx"))
        cpu = " / ".join(f"{statistics.median(r.cpu_us for r in runs[w]):.0f}" for w in runs)
        errs = "; ".join(r.errors for rs in runs.values() for r in rs if r.errors)
        rows.append(
            f"| {name} | {rps['agent']:.0f} | {mib['agent']:.0f} | {rps['nginx']:.0f}"
            f" | {mib['nginx']:.0f} | {ratio:.2f}x | >= {TARGETS_L1[name]}x {mark} | {cpu} |"
            f" {each}{' ERRORS: ' + errs if errs else ''} | {max(loads):.1f} |"
        )
    return rows


# -- 2 and 3. the cold storm, all-warm, agent RSS -------------------------------------


class RssSampler:
    """Peak VmRSS of some pids, sampled every 100 ms while running as a task."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.samples = 0

    async def run(self) -> None:
        for _ in range(36_000):  # bounded: one hour of samples
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_bytes(pid))
            self.samples += 1
            await asyncio.sleep(0.1)


@dataclass
class Sampled:
    results: list[Result]
    peak_rss: dict[int, int]  # pid -> bytes
    client_cpu: float  # cores the client used


async def sampled(pids: list[int], targets: list[tuple[int, str]]) -> Sampled:
    sampler = RssSampler(pids)
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(0.15)  # at least one sample before the load
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        results = await storm(targets)
    finally:
        task.cancel()
    client = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return Sampled(results, sampler.peak, client)


def metric_sum(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Stack:
    endpoint: str  # the S3 store, direct
    peer_ports: list[int]
    agent_ports: list[int]
    agent_pids: list[int]
    procs: Procs
    seaweedfs: SeaweedFS | None = None  # None: moto, a child in procs

    def store_gets(self) -> int:
        """Blob GETs the store has answered so far, by its own count (moto's
        request log; SeaweedFS's metrics, where HEADs count as GETs)."""
        if self.seaweedfs is not None:
            return self.seaweedfs.s3_requests(BUCKET, "GET")
        return len(re.findall(rf'"[^"]*GET /{BUCKET}/blobs/sha256/', self.procs.log_of("moto")))

    def origin_fetches_in_metrics(self) -> float:
        ports = self.peer_ports + self.agent_ports
        return sum(
            metric_sum(p, "cachesvc_upstream_fetches_total", upstream="origin") for p in ports
        )

    def stop_store(self) -> None:
        if self.seaweedfs is not None:
            self.seaweedfs.stop(graceful=False)


def start_store(work: Path, procs: Procs, kind: str) -> tuple[str, SeaweedFS | None]:
    """The S3 store (moto or SeaweedFS) with the bench's bucket: (endpoint, server)."""
    import boto3

    server = None
    if kind == "seaweedfs":
        server = SeaweedFS(work / "seaweedfs", log_file=procs.logs / "seaweedfs.log", metrics=True)
        procs.logs.mkdir(parents=True, exist_ok=True)
        endpoint = server.start().endpoint
    else:
        port = free_port()
        procs.start("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(endpoint + "/", ok=())
    try:
        boto3.client("s3", endpoint_url=endpoint, **_boto_creds()).create_bucket(Bucket=BUCKET)
    except BaseException:
        if server is not None:
            server.stop(graceful=False)
        raise
    return endpoint, server


def start_stack(work: Path, procs: Procs, kind: str) -> Stack:
    endpoint, server = start_store(work, procs, kind)
    try:
        stack = start_services(work, procs, endpoint, server)
        warm_up(stack, work)
    except BaseException:
        if server is not None:
            server.stop(graceful=False)
        raise
    return stack


def start_services(work: Path, procs: Procs, endpoint: str, server: SeaweedFS | None) -> Stack:
    """3 peers and 2 agents over the store at ``endpoint``, ready."""
    origin = ["--origin", f"s3://{BUCKET}", "--s3-endpoint", endpoint]
    peer_ports = [free_port() for _ in range(3)]
    peers = ",".join(f"http://127.0.0.1:{p}" for p in peer_ports)
    for i, port in enumerate(peer_ports):
        advertise = f"http://127.0.0.1:{port}"
        argv = service_argv("peer", port, work / f"peer{i}", *origin, "--peers", peers,
                            "--advertise", advertise)  # fmt: skip
        procs.start(f"peer{i}", argv, AWS_ENV)
    agent_ports = [free_port() for _ in range(2)]
    pids = []
    for i, port in enumerate(agent_ports):
        argv = service_argv("agent", port, work / f"agent{i}", *origin, "--peers", peers)
        pids.append(procs.start(f"agent{i}", argv, AWS_ENV).pid)
    for port in peer_ports + agent_ports:
        wait_http(f"http://127.0.0.1:{port}/readyz")
    return Stack(endpoint, peer_ports, agent_ports, pids, procs, server)


def warm_up(stack: Stack, work: Path) -> None:
    """One small GET through every process, so the storms measure a running
    service, not first-call costs (botocore's lazy model loading, the first
    connection from each agent to the peers)."""
    path = work / "warm-up.bin"
    path.write_bytes(os.urandom(1024))
    hex_ = publish(path, f"s3://{BUCKET}", "--s3-endpoint", stack.endpoint)
    for port in stack.peer_ports:
        get_all(f"http://127.0.0.1:{port}/blob/{hex_}")
    for port in stack.agent_ports:
        get_all(f"http://127.0.0.1:{port}/pkg/{hex_}")


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@dataclass
class Summary:
    """Of one batch of GETs: complete/all, responses per tier, seconds."""

    ok: str
    tiers: str
    ttfb50: float
    ttfb99: float
    total50: float
    total99: float


def summary(results: list[Result]) -> Summary:
    ok = [r for r in results if r.complete]
    ttfb, total = [r.ttfb for r in ok], [r.total for r in ok]
    return Summary(
        ok=f"{len(ok)}/{len(results)}",
        tiers=", ".join(
            f"{t or '-'}:{n}" for t, n in sorted(Counter(r.tier for r in results).items())
        ),
        ttfb50=pct(ttfb, 50) if ok else math.nan,
        ttfb99=pct(ttfb, 99) if ok else math.nan,
        total50=pct(total, 50) if ok else math.nan,
        total99=pct(total, 99) if ok else math.nan,
    )


def direct_origin_get(stack: Stack, hex_: str, reps: int) -> tuple[float, float]:
    """Median (TTFB, total) of one curl GET of the blob straight from the store
    (a presigned URL: SeaweedFS checks its signature, moto ignores it)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.endpoint, **_boto_creds())
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": f"blobs/sha256/{hex_}"}, ExpiresIn=600
    )
    runs = []
    for _ in range(reps):
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", CURL_TIMES, url],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout.split()  # fmt: skip
        assert out[2] == "200", out
        runs.append((float(out[0]), float(out[1])))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


@dataclass
class Phase:
    """The 100 GETs of one storm, cold or all-warm."""

    summary: Summary
    rss: int  # the highest peak RSS of the agents, bytes
    client_cpu: float

    @classmethod
    def of(cls, run: Sampled) -> Phase:
        return cls(summary(run.results), max(run.peak_rss.values()), run.client_cpu)


@dataclass
class Storm:
    hex: str
    store_gets: int  # by the store's own count
    metric_gets: float  # by the services' metrics
    cold: Phase
    warm: Phase


async def one_storm(stack: Stack, work: Path, n: int) -> Storm:
    """A fresh 64 MiB package: cold storm, then the same requests all-warm."""
    path = work / f"storm{n}.bin"
    path.write_bytes(os.urandom(64 * MiB))
    hex_ = publish(path, f"s3://{BUCKET}", "--s3-endpoint", stack.endpoint)
    path.unlink()
    before, store_before = stack.origin_fetches_in_metrics(), stack.store_gets()
    targets = [(stack.agent_ports[i % 2], f"/pkg/sha256:{hex_}") for i in range(100)]
    cold = await sampled(stack.agent_pids, targets)
    fetched = stack.origin_fetches_in_metrics() - before
    tier, got = get_all(f"http://127.0.0.1:{stack.agent_ports[0]}/pkg/sha256:{hex_}")
    assert got == hex_ and tier == "L1", (tier, got)
    warm = await sampled(stack.agent_pids, targets)
    return Storm(hex_, stack.store_gets() - store_before, fetched, Phase.of(cold), Phase.of(warm))


async def bench_storms(work: Path, procs: Procs, storms: int, kind: str) -> list[str]:
    work.mkdir(parents=True)
    stack = start_stack(work, procs, kind)
    try:
        return await storms_on(stack, work, storms)
    finally:
        procs.stop_all()
        stack.stop_store()


async def storms_on(stack: Stack, work: Path, storms: int) -> list[str]:
    runs = []
    for n in range(storms):
        runs.append(await one_storm(stack, work, n))
        c, w = runs[-1].cold.summary, runs[-1].warm.summary
        print(f"  storm {n}: cold total p99 {c.total99:.3f}s ttfb p99 {c.ttfb99:.3f}s, "
              f"warm total p99 {w.total99:.3f}s", flush=True)  # fmt: skip
    hex_ = runs[-1].hex
    idle = rss_bytes(stack.agent_pids[0])
    one_agent = [(stack.agent_ports[0], f"/pkg/sha256:{hex_}")] * 100
    rss_runs = []
    for _ in range(3):
        run = await sampled(stack.agent_pids[:1], one_agent)
        rss_runs.append((summary(run.results), run.peak_rss[stack.agent_pids[0]]))
    direct = direct_origin_get(stack, hex_, 3)
    return report_storms(runs, direct, idle, rss_runs)


def report_storms(
    runs: list[Storm], direct: tuple[float, float], idle: int, rss_runs: list[tuple[Summary, int]]
) -> list[str]:
    rows = [
        "| run | origin GETs (store's count / metrics) | requests ok | tiers | TTFB p50 | TTFB p99"
        " | total p50 | total p99 | agent RSS peak | client CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(runs):
        for phase, p in (("cold", r.cold), ("warm", r.warm)):
            s = p.summary
            gets = f"{r.store_gets} / {r.metric_gets:.0f}" if phase == "cold" else "-"
            rows.append(
                f"| {phase} {n} | {gets} | {s.ok} | {s.tiers} | {s.ttfb50:.3f} s"
                f" | {s.ttfb99:.3f} s | {s.total50:.3f} s | {s.total99:.3f} s"
                f" | {p.rss / 1e6:.0f} MB | {p.client_cpu:.2f} |"
            )
    ratios = [r.cold.summary.total99 / r.warm.summary.total99 for r in runs]
    ttfb99 = [r.cold.summary.ttfb99 for r in runs]
    store_gets = [r.store_gets for r in runs]
    rows += [
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| origin GETs per cold storm (store's count) | {', '.join(map(str, store_gets))}"
        f" | 1 {'ok' if set(store_gets) == {1} else '**missed**'} |",
        f"| storm total p99 / warm total p99 | median {statistics.median(ratios):.2f}x"
        f" (runs: {', '.join(f'{x:.2f}' for x in ratios)})"
        f" | <= 1.1x {'ok' if statistics.median(ratios) <= 1.1 else '**missed**'} |",
        f"| storm TTFB p99 | median {statistics.median(ttfb99):.3f} s"
        f" (runs: {', '.join(f'{x:.3f}' for x in ttfb99)})"
        f" | <= 0.2 s {'ok' if statistics.median(ttfb99) <= 0.2 else '**missed**'} |",
        f"| direct origin GET, 64 MiB, one curl (median of 3) | TTFB {direct[0]:.3f} s,"
        f" total {direct[1]:.3f} s ({64 / direct[1]:.0f} MiB/s) | baseline |",
    ]
    peak = max(p for _, p in rss_runs)
    each = "; ".join(
        f"{p / 1e6:.0f} MB ({s.ok} ok, total p99 {s.total99:.2f} s)" for s, p in rss_runs
    )
    rows += [
        f"| agent RSS peak, 100 concurrent 64 MiB L1 downloads from one agent | {peak / 1e6:.0f} MB"
        f" (idle before: {idle / 1e6:.0f} MB; runs: {each})"
        f" | < 300 MB {'ok' if peak < 300e6 else '**missed**'} |",
    ]
    return rows


def header() -> list[str]:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    nginx = "nginx not run"
    if shutil.which("nginx"):
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return [
        "# read path: L1 hits vs nginx, cold storm vs warm, agent RSS",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/read_path.py', *sys.argv[1:]])}` at {commit},"
        f" {time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, Linux {platform.release()},"
        f" Python {platform.python_version()}, {nginx}, {shutil.which('wrk')}. Loopback only.",
        "",
    ]


def l1_blocker() -> str | None:
    """Why part 1 (L1 hits against nginx, measured with wrk) cannot run here."""
    try:
        require({"nginx": "nginx", "wrk": "wrk"})
    except ToolUnavailable as exc:
        return str(exc)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s wrk runs, once; one storm")
    parser.add_argument("--storms", type=int, default=3, help="cold/warm storm pairs")
    parser.add_argument("--skip-l1", action="store_true", help="only the storms and RSS")
    parser.add_argument(
        "--origin",
        choices=["moto", "seaweedfs"],
        default="moto",
        help="the S3 store of the storms: moto (a mock) or seaweedfs (a real store)",
    )
    args = parser.parse_args()
    try:
        require({"curl": "curl"})
    except ToolUnavailable as exc:
        sys.exit(f"read_path: cannot run the storms: {exc}")
    l1_missing = None if args.skip_l1 else l1_blocker()
    reps, seconds, storms = (1, 3, 1) if args.quick else (3, 10, args.storms)
    work = Path(tempfile.mkdtemp(prefix="read_path."))
    work.chmod(0o755)  # nginx workers (an unprivileged user) read files below it
    procs = Procs(work / "logs")
    lines = header()
    try:
        if l1_missing is not None:
            print(f"1. L1-hit throughput: left out: {l1_missing}", flush=True)
            lines += [f"## 1. L1-hit throughput: left out: {l1_missing}", ""]
        elif not args.skip_l1:
            print("1. L1-hit throughput (wrk -t2 -c32)", flush=True)
            lines += [f"## 1. L1-hit throughput: wrk -t2 -c32 -d{seconds}s, median of {reps}", ""]
            lines += bench_l1(work / "l1", procs, reps, seconds)
            procs.stop_all()
            lines.append("")
        print("2. cold storm and all-warm, 3. agent RSS", flush=True)
        lines += [
            f"## 2. cold storm (3 peers + 2 agents, {args.origin} origin, 64 MiB, 100 GETs at"
            " once, 50 per agent) and the same all-warm; 3. agent RSS",
            "",
        ]
        lines += asyncio.run(bench_storms(work / "storm", procs, storms, args.origin))
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "out" / "read_path.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

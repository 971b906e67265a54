"""Locust users that fetch code packages the way a FaaS platform does.

Every user reads each body to the last byte in 1 MiB chunks and discards it,
records latency *to the last byte* in locust's statistics (not to the
headers), and fails the request unless the status is 200 and the byte count
is the package size. The same users hit cachesvc agents, the origin bucket
directly, or a caching proxy: only ``--host``/``--hosts`` and
``--path-template`` change.

Users (pick one or more by class name on the command line):

* ``HitUser``: a steady mix over many packages with Zipf popularity (the hit
  path once the popular ones are cached).
* ``StormUser``: a cold storm: every user is a new instance of one new
  function; it fetches the package once, then lives on (``--hold``).
* ``WaveUser`` with ``--shape waves``: concurrency doubling every ``--step``
  seconds, 1, 2, 4 ... ``--peak``; each new instance fetches the package.
* ``BurstUser`` with ``--shape burst``: a steady ``--base`` instances with
  bursts to ``--peak``; each new instance fetches the package.
* ``TenantWarmUser``: the first user warms the tenant (``--warm api``: the
  agents' ``POST /warm``; ``get``: one GET per package; ``none``), then all
  users send Zipf traffic over the tenant's packages.

Packages come from a JSON manifest (``--packages``)::

    {"hit": [{"hex": "<64 hex>", "size": 123}, ...], "storm": [...],
     "waves": [...], "burst": [...], "warm": {"tenant": "t1", "packages": [...]}}

Example against a real agent::

    locust -f loadtest/locustfile.py --headless --host http://10.0.0.7:8700 \\
        --packages packages.json --shape waves --step 10 --peak 32 WaveUser
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import IO, Any, TypeVar

import gevent
import gevent.event
from locust import LoadTestShape, constant, events, task
from locust.contrib.fasthttp import FastHttpUser, ResponseContextManager
from locust.env import Environment
from locust.event import EventHook

CHUNK = 1 << 20
ZIPF_S = 1.1  # popularity skew of FaaS functions: a few hot, a long tail
WARM_POLL_S = 0.2


@dataclass(frozen=True)
class Package:
    hex: str
    size: int


Listener = TypeVar("Listener", bound=Callable[..., None])


def listener(hook: EventHook) -> Callable[[Listener], Listener]:
    """``@hook.add_listener`` that keeps the listener's type (locust leaves it unannotated)."""

    def add(function: Listener) -> Listener:
        hook.add_listener(function)
        return function

    return add


def options_of(environment: Environment) -> Namespace:
    """Locust's parsed command line (with the options added below); users and
    shapes only run under it."""
    if environment.parsed_options is None:
        raise RuntimeError("cachesvc load test users need locust's command line (--packages ...)")
    options: Namespace = environment.parsed_options  # configargparse's: untyped
    return options


@listener(events.init_command_line_parser)
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("cachesvc load test")
    add = group.add_argument
    add(
        "--path-template",
        default="/pkg/sha256:{hex}",
        env_var="LOADTEST_PATH_TEMPLATE",
        help="URL path of a package; {hex} is replaced by the digest's hex",
    )
    add("--packages", default="", env_var="LOADTEST_PACKAGES", help="JSON package manifest")
    add(
        "--hosts",
        default="",
        env_var="LOADTEST_HOSTS",
        help="comma-separated base URLs to spread users over (default: --host)",
    )
    add(
        "--samples",
        default="",
        env_var="LOADTEST_SAMPLES",
        help="CSV file to append one row per fetch to",
    )
    add(
        "--shape",
        default="steady",
        choices=["steady", "waves", "burst"],
        env_var="LOADTEST_SHAPE",
        help="load shape (steady: -u/-r/-t)",
    )
    add(
        "--step",
        type=float,
        default=10.0,
        env_var="LOADTEST_STEP",
        help="waves: seconds per level; burst: seconds per cycle",
    )
    add(
        "--peak",
        type=int,
        default=32,
        env_var="LOADTEST_PEAK",
        help="waves: last level; burst: users during a burst",
    )
    add("--base", type=int, default=2, env_var="LOADTEST_BASE", help="burst: steady users")
    add("--cycles", type=int, default=3, env_var="LOADTEST_CYCLES", help="burst: bursts")
    add(
        "--hold",
        type=float,
        default=3600.0,
        env_var="LOADTEST_HOLD",
        help="seconds an instance lives after its cold start before it is recycled",
    )
    add(
        "--warm",
        default="api",
        choices=["api", "get", "none"],
        env_var="LOADTEST_WARM",
        help="TenantWarmUser: how to warm before traffic",
    )
    add(
        "--warm-timeout",
        type=float,
        default=300.0,
        env_var="LOADTEST_WARM_TIMEOUT",
        help="seconds to wait for a warm job",
    )


# -- samples: one CSV row per fetch, for exact percentiles and the plots ----------

SAMPLE_FIELDS = ["start", "latency_ms", "bytes", "status", "tier", "name", "hex", "error"]
_samples: dict[str, Any] = {}


@listener(events.test_start)
def _open_samples(environment: Environment, **_: Any) -> None:
    path = environment.parsed_options.samples if environment.parsed_options else ""
    if path and "writer" not in _samples:
        handle: IO[str] = open(path, "a", newline="")  # closed at quit
        writer = csv.writer(handle)
        if handle.tell() == 0:
            writer.writerow(SAMPLE_FIELDS)
        _samples.update(handle=handle, writer=writer)


@listener(events.quitting)
def _close_samples(**_: Any) -> None:
    if "handle" in _samples:
        _samples.pop("handle").close()
        _samples.pop("writer")


def record_sample(row: list[object]) -> None:
    if "writer" in _samples:
        _samples["writer"].writerow(row)


# -- the package manifest ---------------------------------------------------------


@cache
def load_manifest(path: str) -> dict[str, Any]:
    if not path:
        raise RuntimeError("no package manifest: pass --packages FILE or LOADTEST_PACKAGES")
    with open(path) as f:
        manifest: dict[str, Any] = json.load(f)
    return manifest


def packages_of(path: str, role: str) -> list[Package]:
    entry = load_manifest(path)[role]
    items = entry["packages"] if isinstance(entry, dict) else entry
    return [Package(p["hex"], int(p["size"])) for p in items]


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    """Cumulative Zipf weights for ranks 1..n (rank 1 is the most popular)."""
    return list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n + 1)))


# -- users ------------------------------------------------------------------------


class PackageUser(FastHttpUser):
    """Fetches packages of one manifest role; each user sticks to one base URL."""

    abstract = True
    role = ""
    network_timeout = 300.0
    connection_timeout = 10.0
    _ids = itertools.count()

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = self.options = options_of(environment)
        self.index = next(PackageUser._ids)
        hosts = [h for h in (opts.hosts or "").split(",") if h] or [self.host]
        self.base = hosts[self.index % len(hosts)].rstrip("/")
        self.template: str = opts.path_template
        self.packages = packages_of(opts.packages, self.role)
        self.rng = random.Random(self.index)

    def fetch(self, pkg: Package, name: str | None = None) -> None:
        """GET one package to the last byte; a failure unless 200 and all bytes came."""
        url = self.base + self.template.format(hex=pkg.hex)
        label = name or f"GET {self.role}"
        start, t0 = time.time(), time.perf_counter()
        with self.client.get(
            url,
            name=label,
            stream=True,
            catch_response=True,
            headers={"Accept-Encoding": "identity"},
        ) as resp:
            got, error = drain(resp, pkg)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            resp.request_meta["response_time"] = elapsed_ms
            resp.request_meta["response_length"] = got
            if error:
                resp.failure(error)
            else:
                resp.success()
        tier = resp.headers.get("X-Cache-Tier") or resp.headers.get("X-Cache-Status") or ""
        row = [f"{start:.3f}", f"{elapsed_ms:.2f}", got, resp.status_code, tier, label, pkg.hex]
        record_sample([*row, error])


def drain(resp: ResponseContextManager, pkg: Package) -> tuple[int, str]:
    """Read and discard the body; returns (bytes read, error text or "")."""
    if resp.status_code != 200:
        detail = getattr(resp, "error", None) or f"status {resp.status_code}"
        return 0, f"GET sha256:{pkg.hex[:12]}: {detail}"
    got = 0
    try:
        for chunk in resp.iter_content(CHUNK, decode_content=False):
            got += len(chunk)
    except Exception as e:  # connection reset mid-body and the like
        return got, f"GET sha256:{pkg.hex[:12]}: body broke after {got} bytes: {e!r}"
    if got != pkg.size:
        return got, f"GET sha256:{pkg.hex[:12]}: {got} bytes, expected {pkg.size}"
    return got, ""


class ZipfUser(PackageUser):
    """Back-to-back fetches over the role's packages, popularity Zipf(1.1)."""

    abstract = True
    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.cum_weights = zipf_weights(len(self.packages))

    @task
    def fetch_popular(self) -> None:
        self.fetch(self.rng.choices(self.packages, cum_weights=self.cum_weights)[0])


class HitUser(ZipfUser):
    role = "hit"


class InstanceUser(PackageUser):
    """One function instance: fetches its package at cold start, then lives
    ``--hold`` seconds; if still running then, it is recycled (fetches again)."""

    abstract = True

    def wait_time(self) -> float:
        return float(self.options.hold)

    @task
    def cold_start(self) -> None:
        self.fetch(self.packages[0])


class StormUser(InstanceUser):
    role = "storm"


class WaveUser(InstanceUser):
    role = "waves"


class BurstUser(InstanceUser):
    role = "burst"


class TenantWarmUser(ZipfUser):
    """The first user warms the tenant; every user waits for it, then sends traffic."""

    role = "warm"
    _warm_started = False
    _warm_done = gevent.event.Event()

    def on_start(self) -> None:
        cls = TenantWarmUser
        if not cls._warm_started:
            cls._warm_started = True
            try:
                self.warm()
            finally:
                cls._warm_done.set()
        cls._warm_done.wait(self.options.warm_timeout)

    def warm(self) -> None:
        mode = self.options.warm
        if mode == "get":
            for pkg in self.packages:
                self.fetch(pkg, name="warm-up")
        elif mode == "api":
            self._warm_by_api()

    def _warm_by_api(self) -> None:
        """POST /warm on every agent, then poll each job to its end."""
        opts = self.options
        hosts = [h for h in (opts.hosts or "").split(",") if h] or [self.host]
        tenant = load_manifest(opts.packages)["warm"]["tenant"]
        for host in hosts:
            error = warm_agent(self, host.rstrip("/"), tenant, opts.warm_timeout)
            if error:  # no traffic on a tier that was never warmed: stop, say why
                self.environment.runner.quit()
                return


def warm_agent(user: PackageUser, base: str, tenant: str, timeout: float) -> str:
    """Warm one agent through its API; records one "warm-up" request; returns an error or ""."""
    token = os.environ.get("CACHESVC_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"}
    start, t0 = time.time(), time.perf_counter()
    with user.client.post(
        f"{base}/warm",
        json={"tenant": tenant},
        headers=headers,
        name="warm-up",
        catch_response=True,
    ) as resp:
        if resp.status_code != 202:
            error = f"warm API unavailable at {base}: POST /warm answered {resp.status_code}"
            error += f" {(resp.text or '')[:200]!r}"
        else:
            error, done = poll_warm(user, base, resp.json()["job"], headers, timeout)
            resp.request_meta["response_length"] = done.get("bytes", 0)
        resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
        if error:
            resp.failure(error)
        else:
            resp.success()
    elapsed_ms = (time.perf_counter() - t0) * 1000
    status = resp.status_code
    size = resp.request_meta["response_length"]
    record_sample([f"{start:.3f}", f"{elapsed_ms:.2f}", size, status, "warm", "warm-up", "", error])
    return error


def poll_warm(
    user: PackageUser, base: str, job: str, headers: dict[str, str], timeout: float
) -> tuple[str, dict[str, Any]]:
    """Poll ``GET /warm/{job}`` until it ends; returns (error or "", last status)."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = user.client.get(f"{base}/warm/{job}", headers=headers, name="warm status")
        state = resp.json() if resp.status_code == 200 else {"state": f"HTTP {resp.status_code}"}
        if state.get("state") != "running":
            break
        gevent.sleep(WARM_POLL_S)
    if state.get("state") == "done" and not state.get("failed"):
        return "", state
    return f"warm job {job} at {base} ended as {state}", state


# -- load shapes ------------------------------------------------------------------


class ScenarioShape(LoadTestShape):
    """``--shape steady`` (-u at -r for -t), ``waves`` (1, 2, 4 ... ``--peak``
    users, doubling every ``--step`` s) or ``burst`` (``--base`` users with a
    burst to ``--peak`` in the middle 40 % of each ``--step`` s cycle,
    ``--cycles`` times). New instances start at once (100/s)."""

    use_common_options = True
    SPAWN_AT_ONCE = 100.0  # 20 new instances in 0.2 s; locust warns above 100/s

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None  # locust sets it before the first tick
        opts = options_of(self.runner.environment)
        now = float(LoadTestShape.get_run_time(self))  # unannotated in locust
        if opts.shape == "waves":
            return waves(now, opts.step, opts.peak)
        if opts.shape == "burst":
            return bursts(now, opts.step, opts.base, opts.peak, opts.cycles)
        if now >= (opts.run_time or 60):
            return None
        return opts.num_users or 1, float(opts.spawn_rate or 1)


def waves(now: float, step: float, peak: int) -> tuple[int, float] | None:
    users = 2 ** int(now // step)
    return None if users > peak else (users, ScenarioShape.SPAWN_AT_ONCE)


def bursts(now: float, step: float, base: int, peak: int, cycles: int) -> tuple[int, float] | None:
    cycle, phase = divmod(now, step)
    if cycle >= cycles:
        return None
    in_burst = 0.3 * step <= phase < 0.7 * step
    return (peak if in_burst else base), ScenarioShape.SPAWN_AT_ONCE

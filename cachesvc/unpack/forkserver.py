"""The unpack fork server: one long-lived, idle process that forks a worker per request.

A fresh interpreter with the extraction code imported costs 150-200 ms; a
fork of one that already has it costs a few. So :class:`ForkServer` starts
one server per agent process (``subprocess``: ``python -I -S`` with the
agent's ``sys.path``), which imports its target module once and then forks
a child per :meth:`ForkServer.launch`. Only public APIs: ``subprocess``,
``socket.send_fds``/``recv_fds``, ``os.fork``, ``os.waitpid``.

Rejected: ``multiprocessing``'s forkserver. A child it starts first re-runs
the agent's ``__main__`` (an unguarded script unpacks again inside its
worker, and an agent run as a script pays its imports per package); the
only way around it was a copy of the private ``Popen._launch``, which the
next CPython may change under us.

Guarantees:

* **The child holds nothing of the server's.** Before the target runs, the
  child closes the server's sockets (it cannot ask for more children or
  forge another child's exit status); it keeps only stdin, stdout, stderr
  and the descriptors sent with its request.
* **Nothing outlives the agent.** A child dies with the server
  (``PR_SET_PDEATHSIG``); the server kills its children and exits when the
  agent closes the control socket, which the agent's exit does whatever
  kills it (and :func:`atexit` waits for it on a clean exit). A child whose
  agent-side :class:`Child` is closed before it exited is killed.
* **Exit codes are the kernel's.** The server reaps every child and sends
  its exit code (``-N`` for a signal, as :mod:`subprocess` reports it);
  killing goes through the server, which knows the pid is not yet reaped, so
  a reused pid is never signalled.

This module does not know what a child does: its target is
``main(job: bytes, fds: list[int])`` of the module named at start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

Target = Callable[[bytes, list[int]], None]
"""What a child runs: ``job`` as sent, ``fds`` the descriptors sent with it."""

JOB_MAX = 64 * 1024
"""Largest job a request may carry."""
FDS_MAX = 8
"""Most descriptors a request may carry (the child's status socket included)."""
STOP_WAIT = 5.0
"""Seconds the agent waits at exit for the server to kill its children and exit."""

_INT = struct.Struct("=i")
_READY = b"ready"
_PR_SET_PDEATHSIG = 1
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from cachesvc.unpack.forkserver import serve; serve(sys.argv[2], int(sys.argv[3]))"
)


def _server_path() -> list[str]:
    """The agent's ``sys.path`` with the directory holding ``cachesvc`` first: ``-S``
    skips the ``.pth`` files, and with them the finder of an editable install."""
    here = str(Path(__file__).resolve().parents[2])
    return [here, *(p for p in sys.path if p != here)]


class Child:
    """A forked child, seen from the agent: its pid, a sentinel readable once it
    has exited (or the server is gone), and then its exit code."""

    def __init__(self, pid: int, status: socket.socket) -> None:
        self.pid = pid
        self._status = status
        self._exitcode: int | None = None

    @property
    def sentinel(self) -> int:
        return self._status.fileno()

    @property
    def exitcode(self) -> int | None:
        """The exit code once the sentinel was readable; None while it runs, or
        when the server died first (the child then died with it)."""
        if self._exitcode is None and self._status.fileno() >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                got = self._status.recv(_INT.size, socket.MSG_DONTWAIT)
                if len(got) == _INT.size:
                    (self._exitcode,) = _INT.unpack(got)
        return self._exitcode

    def kill(self) -> None:
        """Ask the server to SIGKILL the child, if it has not exited yet."""
        with contextlib.suppress(OSError):
            self._status.send(b"k")

    def close(self) -> None:
        """Forget the child; one still running is killed."""
        self._status.close()


class ForkServer:
    """The agent's side: starts the server once per process (again if it died),
    and launches children through it. Thread-safe; every method blocks (call
    from a thread)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._server: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        atexit.register(self.stop)

    def ensure_running(self) -> None:
        """Start the server if it is not running, and wait until it has imported the
        target (a fresh interpreter: ~0.2 s)."""
        with self._lock:
            self._ensure()

    def launch(self, job: bytes, fds: Sequence[int]) -> Child:
        """Fork a child running the target on ``job`` with copies of ``fds``
        (the caller keeps and closes its own). Raises :class:`OSError` when the
        server cannot fork."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                socket.send_fds(self._ensure(), [job], [theirs.fileno(), *fds])
            theirs.close()
            got = mine.recv(_INT.size)
            if len(got) != _INT.size:
                raise OSError("the unpack fork server could not fork a worker")
            return Child(_INT.unpack(got)[0], mine)
        except BaseException:
            mine.close()
            theirs.close()
            raise

    def stop(self) -> None:
        """Stop the server: it kills its children and exits (waited for, at most
        :data:`STOP_WAIT` seconds, then killed). The next launch starts another."""
        with self._lock:
            self._stop()

    def _ensure(self) -> socket.socket:
        if self._server is not None and self._server.poll() is None:
            assert self._control is not None
            return self._control
        self._stop()  # it died (or, in a forked agent, it is the parent's)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            command = [sys.executable, "-I", "-S", "-c", _BOOT, json.dumps(_server_path())]
            self._server = subprocess.Popen(
                [*command, self.target, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
            )
        self._control = mine
        if mine.recv(len(_READY)) != _READY:
            self._stop()
            raise OSError("the unpack fork server did not start (its stderr says why)")
        return mine

    def _stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._server is not None:
            try:
                self._server.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None


# ---- the server process ----


def serve(target: str, control_fd: int) -> None:
    """The server's whole life: import ``target``, then fork a child per request
    until the agent closes ``control_fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when we stop
    main: Target = importlib.import_module(target).main
    control = socket.socket(fileno=control_fd)
    server = _Server(control, main)
    control.send(_READY)
    server.run()


class _Server:
    """One thread, one selector: requests on the control socket, kill requests
    on each child's status socket, SIGCHLD through a wakeup pipe."""

    def __init__(self, control: socket.socket, main: Target) -> None:
        self.control, self.main = control, main
        self.children: dict[int, socket.socket | None] = {}  # pid -> its status socket
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.control, selectors.EVENT_READ, self._request)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._reap)

    def run(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select():
                handle: Callable[[], None] = key.data
                handle()
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def _request(self) -> None:
        job, fds, _flags, _addr = socket.recv_fds(self.control, JOB_MAX, FDS_MAX)
        if not job and not fds:  # the agent closed its end: it stopped us or exited
            self.stopping = True
            return
        if not fds:
            return
        status = socket.socket(fileno=fds[0])
        try:
            pid = self._fork(job, fds[1:], status)
        except OSError:  # the agent reads no pid: its launch fails
            traceback.print_exc()
            status.close()
            return
        finally:
            for fd in fds[1:]:
                os.close(fd)
        with contextlib.suppress(OSError):
            status.send(_INT.pack(pid))
        self.children[pid] = status
        self.selector.register(status, selectors.EVENT_READ, lambda: self._kill(pid))

    def _fork(self, job: bytes, fds: list[int], status: socket.socket) -> int:
        server = os.getpid()  # read before the fork: the child's parent may be gone already
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._become_child(server, status)
                self.main(job, fds)
                code = 0
            except BaseException:
                traceback.print_exc(limit=20)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def _become_child(self, server: int, status: socket.socket) -> None:
        """Die with the server; drop everything of the server's."""
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server:  # the server died before the prctl
            os._exit(1)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.close()
        self.control.close()
        status.close()
        for other in self.children.values():
            if other is not None:
                other.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _kill(self, pid: int) -> None:
        """The agent asked to kill ``pid``, or closed its end (the same, and
        nobody waits for the exit code any more)."""
        status = self.children.get(pid)
        if status is None:
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still the child's
        with contextlib.suppress(OSError):
            if status.recv(16, socket.MSG_DONTWAIT):
                return
        self.selector.unregister(status)
        status.close()
        self.children[pid] = None

    def _reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status = self.children.pop(pid, None)
            if status is not None:
                with contextlib.suppress(OSError):
                    status.send(_INT.pack(os.waitstatus_to_exitcode(wait_status)))
                self.selector.unregister(status)
                status.close()

"""``agent --runtime`` and ``publish --bytecode`` on the command line: real parser, real agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cachesvc.cli.main import build_parser

AGENT = ["agent", "--origin", "file:///nowhere"]


def test_runtimes_repeat_and_the_command_line_replaces_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHESVC_RUNTIME", "a=/usr/bin/python3.11, b=/opt/py/bin/python3")
    assert build_parser().parse_args(AGENT).runtimes == (
        "a=/usr/bin/python3.11",
        "b=/opt/py/bin/python3",
    )
    given = [*AGENT, "--runtime", "c=/c/python", "--runtime", "d=/d/python"]
    assert build_parser().parse_args(given).runtimes == ("c=/c/python", "d=/d/python")
    monkeypatch.delenv("CACHESVC_RUNTIME")
    assert build_parser().parse_args(AGENT).runtimes == ()


@pytest.mark.slow  # a cachesvc process
def test_a_runtime_without_an_absolute_path_is_one_line_and_status_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cachesvc", *AGENT, "--runtime", "python3.11"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "cachesvc: --runtime 'python3.11' (from the command line): NAME=PATH, "
        "e.g. python3.11=/usr/bin/python3.11 (an absolute path)"
    )


@pytest.mark.slow  # a cachesvc process
def test_an_agent_whose_runtime_cannot_run_does_not_start(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "cachesvc", "agent", "--listen", "127.0.0.1:0"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--code-dir", str(tmp_path / "code")]
    argv += ["--origin", f"file://{tmp_path}", "--runtime", f"py={tmp_path}/no-python"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(
        f"cachesvc: --runtime py={tmp_path}/no-python: cannot ask {tmp_path}/no-python for "
        "its cache tag"
    )

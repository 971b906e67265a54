"""The bytecode flags: ``agent --runtime NAME=PATH`` and ``publish --bytecode PYTHON``.

Each is added by one call from its command's parser, so the flags stay one
block wherever the commands live. ``--runtime`` is repeatable; without it on
the command line, ``CACHESVC_RUNTIME`` gives a comma-separated list.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from cachesvc.config import FlagValue, env_name

RUNTIME_FLAG = "--runtime"


def parse_runtime(text: str) -> str:
    """``NAME=PATH`` with an absolute PATH (the interpreter is asked for its cache
    tag when the agent starts)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path.startswith("/"):
        raise ValueError("NAME=PATH, e.g. python3.11=/usr/bin/python3.11 (an absolute path)")
    return text


class _Runtimes(argparse.Action):
    """Append, except that the first ``--runtime`` given replaces the environment's list."""

    def __call__(
        self, parser: Any, namespace: Any, values: Any, option_string: str | None = None
    ) -> None:
        given = getattr(namespace, "_runtimes_given", False)
        current: Sequence[str] = getattr(namespace, self.dest) if given else ()
        setattr(namespace, self.dest, (*current, values))
        namespace._runtimes_given = True


def add_runtime_flag(agent: argparse.ArgumentParser) -> None:
    env = os.environ.get(env_name(RUNTIME_FLAG))
    check = FlagValue(RUNTIME_FLAG, parse_runtime)
    default = tuple(check(item.strip()) for item in (env or "").split(",") if item.strip())
    agent.add_argument(
        RUNTIME_FLAG,
        dest="runtimes",
        metavar="NAME=PATH",
        action=_Runtimes,
        type=check,
        default=default,
        help="a function runtime of this host (repeatable): unpacked trees get bytecode "
        f"made by this interpreter, in the background [env {env_name(RUNTIME_FLAG)}, "
        "comma-separated]",
    )


def add_bytecode_flag(pub: argparse.ArgumentParser) -> None:
    pub.add_argument(
        "--bytecode",
        action="append",
        default=[],
        metavar="PYTHON",
        help="compile the package's .py files with this interpreter (a name on PATH or a "
        "path; repeatable) and ship the pycs in the package",
    )

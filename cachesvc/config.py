"""Settings: one frozen :class:`Settings` per command, from flags and ``CACHESVC_*``.

Every flag can be given as ``CACHESVC_<FLAG>`` (upper case, ``-`` as ``_``);
a flag on the command line wins over the environment. Secrets are read from the
environment only, here and nowhere else: ``CACHESVC_TOKEN`` (operator API) and
``CACHESVC_PEER_TOKEN`` (between tiers). Sizes accept ``512MiB``, ``10GiB``,
``2G``, plain bytes.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``"512MiB"`` → 536870912. Raises ValueError for anything else."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m[2].lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 512MiB, 10GiB, 1048576)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}


def parse_duration(text: str | float) -> float:
    """``"2s"``, ``"6h"``, ``"1d"``, ``"500ms"``, ``"90"`` (seconds) → seconds,
    more than 0. Raises ValueError for anything else."""
    if isinstance(text, int | float):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*", text.lower())
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration (examples: 2s, 90m, 6h, 1d)")
    return float(m[1]) * _SECONDS[m[2]]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port)."""
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", text.strip())
    if m is None or not 0 <= int(m[2]) < 65536:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return m[1] or "0.0.0.0", int(m[2])


def operator_token() -> str | None:
    """``CACHESVC_TOKEN``, for clients of the operator API (``warm``, ``publish --warm``)."""
    return os.environ.get("CACHESVC_TOKEN") or None


def env_value(flag: str) -> str | None:
    """The ``CACHESVC_<FLAG>`` value of a flag, for flags argparse cannot default
    (``action="append"``)."""
    return os.environ.get(env_name(flag))


def env_name(flag: str) -> str:
    return "CACHESVC_" + flag.lstrip("-").upper().replace("-", "_")


def add_flag(parser: argparse.ArgumentParser, flag: str, help: str, **kw: Any) -> None:
    """A flag whose default comes from ``CACHESVC_<FLAG>`` when set.

    Defaults are given as strings, so argparse converts the environment's value
    and the built-in default with the same ``type`` as the command line's.
    """
    env = os.environ.get(env_name(flag))
    if env is not None:
        kw["default"] = env
        kw.pop("required", None)
    shown = f" [env {env_name(flag)}]"
    if kw.get("default") not in (None, ""):
        shown += f" (default: {kw['default']})"
    parser.add_argument(flag, help=help + shown, **kw)


@dataclass(frozen=True)
class Settings:
    """Everything a service needs; built by the CLI, ``up`` and tests alike."""

    listen: tuple[str, int]
    cache_dir: Path
    cache_size: int
    origin: str
    s3_endpoint: str | None = None
    peers: str = ""
    code_dir: Path | None = None
    max_package_size: int = 2 * 2**30
    max_unpacked_size: int = 4 * 2**30
    max_files: int = 100_000
    origin_timeout: float = 30.0
    peer_connect_timeout: float = 1.0
    peer_read_timeout: float = 30.0
    max_fetches: int = 64
    max_queued: int = 256
    pin_share: float = 0.5
    prefetch_calls: bool = True
    dns_interval: float = 10.0
    scrub_interval: float = 86400.0
    scrub_rate: int = 64 * 2**20
    advertise: str | None = None
    token: str | None = field(default=None, repr=False)
    peer_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """From parsed flags; secrets from the environment."""
        names = set(cls.__dataclass_fields__) - {"token", "peer_token"}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return cls(
            **values,
            token=os.environ.get("CACHESVC_TOKEN") or None,
            peer_token=os.environ.get("CACHESVC_PEER_TOKEN") or None,
        )

    @property
    def listen_url(self) -> str:
        host, port = self.listen
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

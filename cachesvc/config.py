"""Settings: one frozen :class:`Settings` per command; :func:`add_flag` and the
common value parsers (sizes, durations, counts, listen addresses, origins).
Reads the environment (``CACHESVC_*``, the only source of the secrets
``CACHESVC_TOKEN`` and ``CACHESVC_PEER_TOKEN``); builds no parser (each
command module adds its own flags). Accepted forms: README "Configuration".

* A flag made with :func:`add_flag` can be given as ``CACHESVC_<FLAG>``; the
  command line wins over the variable.
* Every time flag is parsed by :func:`parse_duration`.
* A value that does not parse is a one-line :class:`ConfigError` naming the
  flag, the value, where it came from and the accepted forms. Rejected:
  argparse's own conversion errors, which blame the flag for a variable's
  value after a usage dump; :func:`add_flag` wraps every ``type`` instead.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from cachesvc.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip

# -- value parsers: each raises ValueError saying what is wrong and what to use ----------


def parse_size(text: str | int) -> int:
    """``"512MiB"`` → 536870912. Raises ValueError for anything else."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m[2].lower() not in _UNITS:
        raise ValueError("not a size; use 512MiB, 10GiB or bytes")
    return int(float(m[1]) * _UNITS[m[2].lower()])


_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
DURATION_FORMS = "seconds (30, 0.5) or 500ms, 2s, 90m, 6h, 1d"


def parse_duration(text: str, *, zero: bool = False) -> float:
    """The one parser of every time flag: ``"30"``, ``"0.5"`` (a bare number is
    seconds), ``"500ms"``, ``"2s"``, ``"90m"``, ``"6h"``, ``"1d"`` → seconds, more
    than 0; 0 too with ``zero`` (``--shutdown-grace 0``: do not wait). Raises
    ValueError for anything else (``"-1"``, ``"nan"``, ``"1e3"``, ``"1w"``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*", text.lower())
    if m is None:
        raise ValueError(f"not a duration; use {DURATION_FORMS}")
    seconds = float(m[1]) * _SECONDS[m[2]]
    if seconds == 0 and not zero:
        raise ValueError(f"not a positive duration; use {DURATION_FORMS}")
    return seconds


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port); an empty host is 0.0.0.0 and
    port 0 asks the kernel for a free one."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\s\[\]:/]*)):([0-9]{1,5})", text.strip())
    if m is None or int(m[3]) > 65535:
        raise ValueError("not an address; use HOST:PORT, e.g. 127.0.0.1:8700 or [::1]:8700")
    return m[1] or m[2] or "0.0.0.0", int(m[3])


def parse_count(text: str) -> int:
    """Digits → a whole number ≥ 0."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise ValueError("not a whole number; use digits, e.g. 64")
    return int(text)


def parse_port(text: str) -> int:
    """Digits → a TCP port, 1-65535."""
    if not re.fullmatch(r"\s*[0-9]{1,5}\s*", text) or not 1 <= int(text) <= 65535:
        raise ValueError("not a port; use a number from 1 to 65535")
    return int(text)


def parse_log_level(text: str) -> str:
    """``debug``, ``INFO``, ... → the level's name in upper case."""
    name = text.strip().upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("not a log level; use DEBUG, INFO, WARNING or ERROR")
    return name


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3 bucket naming rules


def parse_runtime(text: str) -> str:
    """``NAME=PATH`` with an absolute PATH (``--runtime``; the interpreter is asked
    for its cache tag when the agent starts)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path.startswith("/"):
        raise ValueError("NAME=PATH, e.g. python3.11=/usr/bin/python3.11 (an absolute path)")
    return text


def parse_origin(text: str) -> str:
    """``s3://BUCKET[/PREFIX]`` or ``file:///DIR``, returned as given."""
    parts = urlsplit(text.strip())
    s3 = parts.scheme == "s3" and _BUCKET.fullmatch(parts.netloc) is not None
    local = parts.scheme == "file" and not parts.netloc and parts.path.startswith("/")
    if not (s3 or local) or parts.query or parts.fragment:
        raise ValueError("not an origin; use s3://BUCKET[/PREFIX] or file:///DIR")
    return text.strip()


def check_dir(flag: str, path: Path) -> None:
    """Raise :class:`ConfigError` naming the flag and the path unless ``path``
    can be this process's directory: one that exists and is writable, or one
    that can be created (its nearest existing parent is a writable directory).

    Creates nothing and writes nothing: the store creates the directory when it
    opens. ``os.access`` answers for the real user and notices read-only
    filesystems even for root. Called before a service starts, not as a flag
    ``type``: parsing a command line must not depend on the disk of the machine
    that parses it (the deploy tests parse the manifests' command lines).
    """
    problem = _dir_problem(path)
    if problem is not None:
        raise ConfigError(f"{flag} {path}: {problem}")


def _dir_problem(path: Path) -> str | None:
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        kind = "a broken symlink" if existing.is_symlink() else "a file"
        return _unusable(path, existing, f"not a directory ({kind})")
    if not os.access(existing, os.W_OK | os.X_OK):
        return _unusable(path, existing, f"not writable ({_why_not_writable(existing)})")
    return None


def _unusable(path: Path, existing: Path, what: str) -> str:
    return what if existing == path else f"cannot create it: {existing} is {what}"


def _why_not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


# -- flags: the CACHESVC_* defaults and the one-line errors --------------------------------

FROM_COMMAND_LINE = "from the command line"

# What the builtin types' own messages would say ("invalid literal for int() with
# base 10"), said as the accepted forms; for flags added with type=int or float.
_BUILTIN_FORMS: dict[Callable[[str], object], str] = {
    int: "not a whole number; use digits, e.g. 64",
    float: "not a number; use e.g. 30 or 0.5",
}


class _Given(str):
    """A default string that remembers where it came from: the variable it was
    read from, or the built-in default. Values typed on the command line are
    plain ``str``, so the converter can tell the three apart."""

    source: str

    @classmethod
    def of(cls, value: str, source: str) -> _Given:
        given = cls(value)
        given.source = source
        return given


_T = TypeVar("_T")


@dataclass(frozen=True)
class FlagValue(Generic[_T]):
    """The ``type`` of a flag added by :func:`add_flag`: converts with ``parse``,
    and turns its ValueError into a :class:`ConfigError` of one line naming the
    flag, the value, its source and the accepted forms."""

    flag: str
    parse: Callable[[str], _T]

    def __call__(self, text: str) -> _T:
        try:
            return self.parse(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            why = _BUILTIN_FORMS.get(self.parse) or str(exc) or "not accepted"
            raise ConfigError(f"{describe(self.flag, text)}: {why}") from None


def describe(flag: str, text: str) -> str:
    """``--flag 'value' (from SOURCE)``: how an error names a setting."""
    source = getattr(text, "source", FROM_COMMAND_LINE)
    return f"{flag} {str(text)!r} ({source})"


def operator_token() -> str | None:
    """``CACHESVC_TOKEN``, for clients of the operator API (``warm``, ``publish --warm``)."""
    return os.environ.get("CACHESVC_TOKEN") or None


def peer_token() -> str | None:
    """``CACHESVC_PEER_TOKEN``, required on every ``/blob`` request when set."""
    return os.environ.get("CACHESVC_PEER_TOKEN") or None


def env_value(flag: str) -> str | None:
    """The ``CACHESVC_<FLAG>`` value of a flag, for flags argparse cannot default
    (``action="append"``)."""
    return os.environ.get(env_name(flag))


def env_name(flag: str) -> str:
    return "CACHESVC_" + flag.lstrip("-").upper().replace("-", "_")


def add_flag(parser: argparse.ArgumentParser, flag: str, help: str, **kw: Any) -> None:
    """A flag whose default comes from ``CACHESVC_<FLAG>`` when set.

    Defaults are given as strings, so argparse converts the environment's value
    and the built-in default with the same ``type`` as the command line's; each
    default remembers its source, and a value that does not convert raises
    :class:`ConfigError` naming it (see the module's docstring).
    """
    env = os.environ.get(env_name(flag))
    if env is not None:
        kw["default"] = _Given.of(env, f"from {env_name(flag)}")
        kw.pop("required", None)
    elif isinstance(kw.get("default"), str):
        kw["default"] = _Given.of(kw["default"], "the default")
    if "type" in kw:
        kw["type"] = FlagValue(flag, kw["type"])
    elif isinstance(kw.get("default"), _Given):
        kw["default"] = str(kw["default"])  # no converter: a plain string for Settings
    shown = f" [env {env_name(flag)}]"
    if kw.get("default") not in (None, ""):
        shown += f" (default: {kw['default']})"
    parser.add_argument(flag, help=help + shown, **kw)


def add_repeated_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    parse: Callable[[str], str],
    metavar: str,
    dest: str,
) -> None:
    """A repeatable flag collected into a tuple; without it on the command line,
    ``CACHESVC_<FLAG>`` gives a comma-separated list. Each value is checked by
    ``parse``, as :func:`add_flag` does."""
    check = FlagValue(flag, parse)
    env = env_value(flag)
    default = tuple(check(_Given.of(item.strip(), f"from {env_name(flag)}"))
                    for item in (env or "").split(",") if item.strip())  # fmt: skip
    parser.add_argument(
        flag, dest=dest, metavar=metavar, action=_Repeated, type=check, default=default,
        help=f"{help} [env {env_name(flag)}, comma-separated]",
    )  # fmt: skip


class _Repeated(argparse.Action):
    """Append, except that the first value on the command line replaces the
    environment's list."""

    def __call__(
        self, parser: Any, namespace: Any, values: Any, option_string: str | None = None
    ) -> None:
        given = f"_{self.dest}_given"
        current = getattr(namespace, self.dest) if getattr(namespace, given, False) else ()
        setattr(namespace, self.dest, (*current, values))
        setattr(namespace, given, True)


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
    unpack_workers: int = 2
    unpack_timeout: float = 300.0
    unpack_memory: int = 2**30
    runtimes: tuple[str, ...] = ()  # NAME=PATH: this host's runtimes, to compile for
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
    fanout: int = 2
    egress_limit: float | None = None
    token: str | None = field(default=None, repr=False)
    peer_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """From parsed flags; secrets from the environment."""
        names = set(cls.__dataclass_fields__) - {"token", "peer_token"}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return cls(**values, token=operator_token(), peer_token=peer_token())

    @property
    def self_url(self) -> str | None:
        """How other hosts reach this one: ``--advertise``, else the listen
        address unless it is a wildcard (then None: no fan-out to this host)."""
        if self.advertise:
            return self.advertise.rstrip("/")
        return None if self.listen[0] in ("0.0.0.0", "::", "") else self.listen_url

    @property
    def listen_url(self) -> str:
        host, port = self.listen
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

"""Flag values and their errors: parsers, CACHESVC_* defaults, directory checks."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from cachesvc.config import (
    add_flag,
    check_dir,
    parse_count,
    parse_duration,
    parse_listen,
    parse_log_level,
    parse_origin,
    parse_port,
    parse_size,
)
from cachesvc.errors import ConfigError
from cachesvc.upstream.origin import make_origin


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (parse_size, "512MiB", 512 * 2**20),
        (parse_size, "10GiB", 10 * 2**30),
        (parse_size, "2G", 2 * 10**9),
        (parse_size, "1048576", 1048576),
        (parse_listen, "127.0.0.1:8700", ("127.0.0.1", 8700)),
        (parse_listen, "[::1]:0", ("::1", 0)),
        (parse_listen, ":8701", ("0.0.0.0", 8701)),
        (parse_listen, "peer-0.cachesvc:8701", ("peer-0.cachesvc", 8701)),
        (parse_count, "64", 64),
        (parse_port, "65535", 65535),
        (parse_duration, "0.5", 0.5),
        (parse_duration, "30", 30.0),
        (parse_duration, "30s", 30.0),
        (parse_duration, "500ms", 0.5),
        (parse_duration, "2m", 120.0),
        (parse_duration, "1.5H", 5400.0),
        (parse_duration, "1d", 86400.0),
        (parse_log_level, "debug", "DEBUG"),
        (parse_origin, "s3://packages/prefix", "s3://packages/prefix"),
        (parse_origin, "file:///var/lib/origin", "file:///var/lib/origin"),
    ],
)
def test_each_parser_accepts_the_documented_forms(parse: Any, text: str, value: Any) -> None:
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text", "forms"),
    [
        (parse_size, "10XB", "use 512MiB, 10GiB or bytes"),
        (parse_size, "", "use 512MiB, 10GiB or bytes"),
        (parse_listen, "8700", "use HOST:PORT"),
        (parse_listen, "h:99999", "use HOST:PORT"),
        (parse_listen, "http://h:1", "use HOST:PORT"),
        (parse_count, "1e5", "use digits"),
        (parse_count, "-1", "use digits"),
        (parse_port, "0", "use a number from 1 to 65535"),
        (parse_duration, "abc", "use seconds (30, 0.5) or 500ms, 2s, 90m, 6h, 1d"),
        (parse_duration, "nan", "use seconds (30, 0.5) or 500ms"),
        (parse_duration, "-1", "use seconds (30, 0.5) or 500ms"),
        (parse_duration, "1e3", "use seconds (30, 0.5) or 500ms"),
        (parse_duration, "1w", "use seconds (30, 0.5) or 500ms"),
        (parse_duration, "0", "use seconds (30, 0.5) or 500ms"),
        (parse_duration, "0ms", "use seconds (30, 0.5) or 500ms"),
        (parse_log_level, "chatty", "use DEBUG, INFO"),
        (parse_origin, "ftp://x", "use s3://BUCKET[/PREFIX] or file:///DIR"),
        (parse_origin, "s3://", "use s3://BUCKET[/PREFIX] or file:///DIR"),
        (parse_origin, "file://relative/dir", "use s3://BUCKET[/PREFIX] or file:///DIR"),
    ],
)
def test_each_parser_refuses_with_the_accepted_forms(parse: Any, text: str, forms: str) -> None:
    with pytest.raises(ValueError, match=r"^not [a-z ]+; " + re.escape(forms)):
        parse(text)


@pytest.mark.parametrize("url", ["file://relative/dir", "s3://", "s3://b?x=1", "ftp://x"])
def test_an_origin_is_checked_as_the_flag_checks_it_wherever_it_is_made(url: str) -> None:
    """``publish`` and the loaders make origins without the flag's parser."""
    with pytest.raises(ValueError, match=re.escape(f"--origin {url!r}: not an origin; use s3://")):
        make_origin(url)


def parser_with(flag: str, **kw: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flag(parser, flag, "help", **kw)
    return parser


def test_a_bad_environment_value_names_the_variable_not_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHESVC_CACHE_SIZE", "10XB")
    parser = parser_with("--cache-size", type=parse_size, default="10GiB")
    with pytest.raises(ConfigError) as caught:
        parser.parse_args([])
    assert str(caught.value) == (
        "--cache-size '10XB' (from CACHESVC_CACHE_SIZE): not a size; use 512MiB, 10GiB or bytes"
    )


def test_a_bad_command_line_value_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHESVC_CACHE_SIZE", raising=False)
    parser = parser_with("--cache-size", type=parse_size, default="10GiB")
    with pytest.raises(ConfigError, match=r"^--cache-size '1x' \(from the command line\): not a"):
        parser.parse_args(["--cache-size", "1x"])


def test_the_command_line_wins_over_a_bad_environment_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHESVC_CACHE_SIZE", "10XB")
    parser = parser_with("--cache-size", type=parse_size, default="10GiB")
    assert parser.parse_args(["--cache-size", "1MiB"]).cache_size == 2**20


def test_good_environment_values_are_converted_like_the_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHESVC_CACHE_SIZE", "2MiB")
    monkeypatch.delenv("CACHESVC_ORIGIN", raising=False)
    parser = parser_with("--cache-size", type=parse_size, default="10GiB")
    add_flag(parser, "--origin", "help", required=True)
    add_flag(parser, "--label", "help", default="x")
    args = parser.parse_args(["--origin", "file:///o"])
    assert (args.cache_size, args.origin, args.label) == (2 * 2**20, "file:///o", "x")
    assert type(args.label) is str  # no provenance marker leaks into the settings


def test_any_flag_type_gets_the_one_line_error_builtin_types_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHESVC_TIMEOUT", "soon")
    monkeypatch.setenv("CACHESVC_SCRUB_INTERVAL", "often")

    def parse_duration(text: str) -> float:  # as another module may add one
        raise ValueError("not a duration; use 2s, 6h or 1d")

    parser = parser_with("--timeout", type=float, default="600")
    add_flag(parser, "--scrub-interval", "help", type=parse_duration, default="1d")
    with pytest.raises(ConfigError, match=r"--timeout 'soon' \(from CACHESVC_TIMEOUT\): not a num"):
        parser.parse_args([])
    with pytest.raises(ConfigError, match=r"\(from CACHESVC_SCRUB_INTERVAL\): not a duration; use"):
        parser.parse_args(["--timeout", "1"])


def test_a_usable_directory_passes_and_nothing_is_created(tmp_path: Path) -> None:
    check_dir("--cache-dir", tmp_path)
    check_dir("--cache-dir", tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_the_directory_should_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        check_dir("--cache-dir", tmp_path / "f")
    assert str(caught.value) == f"--cache-dir {tmp_path / 'f'}: not a directory (a file)"
    with pytest.raises(ConfigError) as caught:
        check_dir("--code-dir", tmp_path / "f" / "code")
    assert str(caught.value) == (
        f"--code-dir {tmp_path / 'f' / 'code'}: cannot create it: "
        f"{tmp_path / 'f'} is not a directory (a file)"
    )


def test_a_broken_symlink_where_the_directory_should_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"link: not a directory \(a broken symlink\)$"):
        check_dir("--cache-dir", tmp_path / "link")


def test_an_unwritable_or_read_only_directory_is_named_with_the_reason(tmp_path: Path) -> None:
    # Root passes every permission check, so the denial is injected here; the
    # real one is exercised through the command in test_cli_errors_functional.
    with mock.patch("os.access", return_value=False):
        with pytest.raises(ConfigError, match=r": not writable \(permission denied\)$"):
            check_dir("--cache-dir", tmp_path)
        read_only = os.statvfs_result((0,) * 8 + (os.ST_RDONLY, 255))
        with (
            mock.patch("os.statvfs", return_value=read_only),
            pytest.raises(ConfigError, match=r"cannot create it: .* \(read-only file system\)$"),
        ):
            check_dir("--cache-dir", tmp_path / "new")

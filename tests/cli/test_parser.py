"""The parser the command modules build, without running a command: every
time flag takes one duration form (a bare number of seconds, or ms, s, m, h,
d), every command explains itself, and the modules stay in their places."""

from __future__ import annotations

import argparse

import grimp
import pytest

from cachesvc.cli.main import COMMANDS, build_parser
from cachesvc.errors import ConfigError

ORIGIN = ["--origin", "file:///x"]
# (command, flag, its attribute): every flag whose value is a time.
TIME_FLAGS = [
    ("agent", "--origin-timeout", "origin_timeout"),
    ("agent", "--shutdown-grace", "shutdown_grace"),
    ("agent", "--dns-interval", "dns_interval"),
    ("agent", "--unpack-timeout", "unpack_timeout"),
    ("agent", "--peer-connect-timeout", "peer_connect_timeout"),
    ("agent", "--scrub-interval", "scrub_interval"),
    ("peer", "--origin-timeout", "origin_timeout"),
    ("peer", "--shutdown-grace", "shutdown_grace"),
    ("peer", "--dns-interval", "dns_interval"),
    ("peer", "--scrub-interval", "scrub_interval"),
    ("warm", "--timeout", "timeout"),
]


def parse(command: str, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *(ORIGIN if command != "warm" else []), *flags])


@pytest.mark.parametrize(("command", "flag", "name"), TIME_FLAGS)
def test_every_time_flag_takes_a_bare_number_of_seconds_or_a_unit(
    command: str, flag: str, name: str
) -> None:
    assert getattr(parse(command, flag, "45"), name) == 45.0
    assert getattr(parse(command, flag, "2m"), name) == 120.0
    assert getattr(parse(command, flag, "250ms"), name) == 0.25


@pytest.mark.parametrize(("command", "flag", "name"), TIME_FLAGS)
def test_every_time_flag_refuses_a_bad_duration_in_one_line_naming_it(
    command: str, flag: str, name: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(command, flag, "3 weeks")
    assert str(caught.value) == (
        f"{flag} '3 weeks' (from the command line): not a duration; "
        "use seconds (30, 0.5) or 500ms, 2s, 90m, 6h, 1d"
    )


def test_only_the_shutdown_grace_may_be_zero() -> None:
    assert parse("agent", "--shutdown-grace", "0").shutdown_grace == 0.0
    for flag in ("--origin-timeout", "--dns-interval", "--scrub-interval", "--unpack-timeout"):
        with pytest.raises(ConfigError, match="not a positive duration; use seconds"):
            parse("agent", flag, "0s")


def test_every_command_and_its_flags_are_explained() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(commands.choices) == ["agent", "peer", "publish", "fetch", "up", "warm"]
    helps = {action.dest: action.help for action in commands._choices_actions}
    assert all(helps[name] for name in commands.choices)
    for name, sub in commands.choices.items():
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert [a.option_strings for a in options if not a.help] == [], name


def test_the_command_modules_import_neither_main_nor_each_other() -> None:
    graph = grimp.build_graph("cachesvc")
    modules = {m.__name__ for m in COMMANDS}
    for module in modules:
        imported = graph.find_modules_directly_imported_by(module)
        assert imported & (modules | {"cachesvc.cli.main"}) == set(), module

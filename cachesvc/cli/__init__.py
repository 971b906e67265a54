"""The ``cachesvc`` command line: one module per command group.

The rule, which keeps adding a flag a change in one place:

- :mod:`~cachesvc.cli.main` builds the parser from the command modules (in the
  order of ``main.COMMANDS``, which is the order of ``cachesvc --help``) and
  owns the exit statuses: a :class:`~cachesvc.errors.ConfigError` is one line
  and 2, a :class:`CommandFailed` one line and 1, Ctrl-C 130.
- Each command module owns its sub-commands whole: ``add_to(commands)`` adds
  them with every flag (default, ``CACHESVC_*`` variable, help), and the run
  function each one's flags lead to. :mod:`~cachesvc.cli.service`: ``agent``
  and ``peer`` (they share their flags); :mod:`~cachesvc.cli.publish`;
  :mod:`~cachesvc.cli.fetch`; :mod:`~cachesvc.cli.up`; :mod:`~cachesvc.cli.warm`.
- A command module imports the library, never ``main`` nor another command
  module; what two commands share lives in the library (``config`` for flags
  and their parsers, ``serve.runner`` to run apps until a signal,
  ``serve.registry`` to find a service, ``warm.client`` for warm jobs).
- Services are found by name through entry points (:mod:`cachesvc.serve.registry`),
  so nothing in ``cachesvc`` imports ``node_agent``.
- Imports sit at the top of a module; one is made lazy only where it measurably
  slows ``cachesvc --help``, with a comment saying so.

No service logic lives here: a command parses, calls the library, and prints.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

#: The ``add_subparsers()`` object each command module adds its commands to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandFailed(Exception):
    """A command could not do its work (an error status, a failed warm): its
    message is printed as one line, ``cachesvc: <message>``, and the exit
    status is 1."""

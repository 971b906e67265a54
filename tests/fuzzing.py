"""How long a fuzz runs: the short budget of ``make test``, or, with
``HYPOTHESIS_PROFILE=long`` (``make fuzz``), one round of the long one."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
"""Cases per round of the long run through HTTP; the in-process property gets ten times as many."""


def budget(short: int, scale: int = 1) -> settings:
    """The short budget for ``make test``, or one round of the long one."""
    health = [HealthCheck.too_slow, HealthCheck.data_too_large]
    if LONG:
        return settings(max_examples=EXAMPLES * scale, deadline=None, suppress_health_check=health)
    return settings(
        max_examples=short,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=health,
    )

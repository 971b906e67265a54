"""The scenarios of ``python -m loadtest run``: what each models, its packages
and its locust arguments, in a full and a ``--quick`` variant.

Every scenario is bounded in users and time; ``limit_s`` is the hard bound on
its locust process (run time plus the time running fetches get to finish).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
KiB = 1 << 10
STOP_TIMEOUT_S = 120  # a fetch running when the shape ends may finish, up to this


@dataclass(frozen=True)
class Scenario:
    name: str
    user: str  # the locustfile's user class
    models: str  # one sentence for the report and the README
    sizes: tuple[int, ...]  # the packages seeded for it (manifest role = name)
    args: tuple[str, ...]  # shape, users, rate, time
    run_s: float  # the planned duration, for the hard bound

    @property
    def limit_s(self) -> float:
        return self.run_s + STOP_TIMEOUT_S + 30

    def shape(self) -> str:
        """The load shape in words, from the locust arguments actually passed."""
        opts = dict(zip(self.args[::2], self.args[1::2], strict=False))
        shape = opts.get("--shape", "steady")
        if shape == "waves":
            peak = int(opts["--peak"])
            levels = ", ".join(str(1 << i) for i in range(peak.bit_length()) if 1 << i <= peak)
            return f"waves of {levels} users, {opts['--step']} s each"
        if shape == "burst":
            return (f"{opts['--base']} users, bursting to {opts['--peak']} for the middle 40 % "
                    f"of each {opts['--step']} s cycle, {opts['--cycles']} cycle(s)")  # fmt: skip
        return f"{opts['-u']} users (started at {opts['-r']}/s), steady for {opts['-t']} s"


def log_spaced(n: int, low: int, high: int) -> tuple[int, ...]:
    """``n`` sizes from ``low`` to ``high``, evenly spaced on a log scale."""
    ratio = (high / low) ** (1 / max(n - 1, 1))
    return tuple(int(low * ratio**i) for i in range(n))


MODELS = {
    "hit": "A steady mix over many packages with Zipf(1.1) popularity: "
    "after the first misses, the hit path.",
    "storm": "A cold storm: many instances of one new function start at once; "
    "each fetches the package once.",
    "waves": "Waves of concurrency doubling every 10 s (1, 2, 4 ... 32 instances); "
    "each new instance fetches the 50 MB package.",
    "burst": "A steady 2 instances with bursts to 20 (3 bursts of 4 s, one every 10 s); "
    "each new instance fetches the 50 MB package.",
    "warm": "A tenant is warmed (cachesvc: POST /warm on each agent; nginx: one GET "
    "per package; origin: nothing), then Zipf traffic over its packages.",
}
USERS = {
    "hit": "HitUser",
    "storm": "StormUser",
    "waves": "WaveUser",
    "burst": "BurstUser",
    "warm": "TenantWarmUser",
}
# name: (package sizes, locust arguments, planned seconds). Shapes tick once a
# second in locust, so quick shapes keep whole-second steps.
FULL: dict[str, tuple[tuple[int, ...], str, float]] = {
    "hit": (log_spaced(100, 64 * KiB, 8 * MiB), "-u 16 -r 100 -t 30", 30),
    "storm": ((50 * MiB,), "-u 40 -r 100 -t 20", 20),
    "waves": ((50 * MiB,), "--shape waves --step 10 --peak 32", 60),
    "burst": ((50 * MiB,), "--shape burst --base 2 --peak 20 --cycles 3 --step 10", 30),
    "warm": (log_spaced(20, 1 * MiB, 8 * MiB), "-u 8 -r 100 -t 20", 20),
}
QUICK: dict[str, tuple[tuple[int, ...], str, float]] = {
    "hit": (log_spaced(20, 16 * KiB, 256 * KiB), "-u 4 -r 100 -t 1", 1),
    "storm": ((MiB,), "-u 10 -r 100 -t 1", 1),
    "waves": ((MiB,), "--shape waves --step 1 --peak 2", 2),
    "burst": ((MiB,), "--shape burst --base 2 --peak 20 --cycles 1 --step 2", 2),
    "warm": (log_spaced(5, 16 * KiB, 64 * KiB), "-u 4 -r 100 -t 1", 1),
}


def scenarios(quick: bool = False) -> dict[str, Scenario]:
    """All scenarios by name; ``quick``: small packages and runs of a few seconds."""
    table = QUICK if quick else FULL
    return {
        name: Scenario(name, USERS[name], MODELS[name], sizes, tuple(args.split()), run_s)
        for name, (sizes, args, run_s) in table.items()
    }

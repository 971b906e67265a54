"""The latency plot of one scenario: every fetch's latency to its last byte over
time, one panel per target, hits and misses told apart by colour, p50 and p99
drawn as lines.

Where a fetch was served from comes from its response (``X-Cache-Tier`` from
cachesvc, ``X-Cache-Status`` from nginx; nothing from the origin itself) and is
grouped into a few classes (:data:`CLASSES`). The legend and the lines are also
written into the PNG's ``Description`` text chunk, so a test (or a script) can
read what the picture shows without looking at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

# tier header value → (class label, colour); in legend order.
CLASSES: dict[str, tuple[str, str]] = {
    "L1": ("hit: the agent's disk (L1)", "tab:green"),
    "HIT": ("hit: nginx's cache", "tab:green"),
    "L2": ("from a peer (L2): an agent miss", "tab:blue"),
    "ORIGIN": ("miss: from the origin", "tab:red"),
    "MISS": ("miss: from the origin", "tab:red"),
    "direct": ("no cache: straight from the origin", "tab:purple"),
}
OTHER = ("other nginx cache status", "tab:orange")


def tier_class(tier: str) -> tuple[str, str]:
    """(label, colour) of a fetch served by ``tier`` ("" = no header: direct)."""
    return CLASSES.get(tier or "direct", OTHER)


@dataclass(frozen=True)
class Fetch:
    """One fetch as plotted: when it ended (s since the target's run began), ms, tier."""

    at: float
    ms: float
    tier: str


@dataclass(frozen=True)
class Panel:
    """One target's fetches."""

    target: str
    fetches: Sequence[Fetch]


def _draw(ax: Axes, panel: Panel) -> list[str]:
    """Scatter one panel by class, draw p50/p99; returns the labels shown."""
    shown: list[str] = []
    for label, colour in dict.fromkeys(tier_class(f.tier) for f in panel.fetches):
        mine = [f for f in panel.fetches if tier_class(f.tier) == (label, colour)]
        text = f"{label} ({len(mine)})"
        ax.scatter([f.at for f in mine], [f.ms for f in mine], s=8, alpha=0.7, c=colour, label=text)
        shown.append(text)
    if panel.fetches:
        ms = np.array([f.ms for f in panel.fetches])
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(ms, q))
            text = f"p{q} {value:.1f} ms"
            ax.axhline(value, color="black", linestyle=style, linewidth=1, label=text)
            shown.append(text)
        ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    ax.set_yscale("log")
    ax.set_ylabel(f"{panel.target}\nms to last byte")
    ax.grid(True, which="both", alpha=0.3)
    return shown


def plot(path: Path, title: str, panels: Sequence[Panel]) -> str:
    """Write the PNG; returns (and stores in the PNG) the description of what it shows."""
    fig, axes = plt.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)
    fig.set_size_inches(10, 2.4 * len(panels) + 0.9)
    lines = []
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        lines.append(f"{panel.target}: {', '.join(_draw(ax, panel)) or 'no fetches'}")
    axes[-1, 0].set_xlabel("seconds since the target's run started (at the fetch's last byte)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    description = "; ".join(lines)
    fig.savefig(path, dpi=90, metadata={"Title": title, "Description": description})
    plt.close(fig)
    return description

"""`overfill eval`'s per-position figures (paper Fig. 8): per_position.png, p(correct token) and NLL by reply
position on the reference replies; agreement_per_position.png, top-1 agreement with the full model's
greedy replies and their NLL by reply position."""

from __future__ import annotations

import math
from pathlib import Path

from overfill.plotting import COLORS, pyplot

# (key of a metrics.per_position curve, y-axis label); the curves of shares are drawn on [0, 1].
REFERENCE_PANELS = (("mean_prob", "mean p(correct token)"), ("mean_nll", "mean NLL of the correct token"))
AGREEMENT_PANELS = (("top1", "top-1 agreement with the full model's token"), ("mean_nll", "mean NLL of the full model's token"))
SHARES = ("mean_prob", "top1")


def position_bins(pos: dict, key: str) -> tuple[list[str], list[float], list[int]]:
    """Count-weighted means of `pos[key]` over doubling reply-position bins: 1, 2-3, 4-7, 8-15, ...

    Later positions are reached by fewer replies, so single positions there are noise; doubling
    bins keep every point resting on many tokens (the paper's Figure 8 reads the same trend).
    """
    labels, means, counts = [], [], []
    low = 1
    while low <= len(pos["position"]):
        high = 1 if low == 1 else min(2 * low - 1, len(pos["position"]))
        c = pos["count"][low - 1 : high]
        if sum(c):
            labels.append(str(low) if low == high else f"{low}-{high}")
            means.append(sum(v * n for v, n in zip(pos[key][low - 1 : high], c)) / sum(c))
            counts.append(sum(c))
        low = high + 1
    return labels, means, counts


def plot_per_position(positions: dict[str, dict], path: Path, *, modes: dict[str, str] | None = None,
                      min_count: int | None = None, panels=REFERENCE_PANELS,
                      title: str = "Teacher-forced quality by reply position (paper Fig. 8)") -> Path:
    """Paper Figure 8: one panel per (curve, label) of `panels`, by reply position, one line per model;
    by default the correct token's mean probability and mean NLL.

    Positions are grouped in doubling bins (position_bins); bins holding fewer than `min_count`
    tokens (default: a tenth of the replies, at least 1) are left out.
    """
    plt = pyplot()

    panels = [(key, label) for key, label in panels if all(key in pos for pos in positions.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    # Bins start at position 1 for every model, so bin i is the same positions for all; the longest
    # reply set names the ticks.
    ticks = max((position_bins(pos, "mean_prob")[0] for pos in positions.values()), key=len)
    for ax, (key, ylabel) in zip(axes[0], panels):
        spare = iter(["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
        refreshed = [name for name in positions if "+refresh" in name]  # one shade each, from short K to long
        shades = dict(zip(refreshed, plt.cm.viridis([0.15 + 0.7 * i / max(1, len(refreshed) - 1) for i in range(len(refreshed))])))
        for name, pos in positions.items():
            floor = min_count or max(1, math.ceil(0.1 * max(pos["count"])))
            _, means, counts = position_bins(pos, key)
            keep = [i for i, c in enumerate(counts) if c >= floor]
            label = f"{name} ({modes[name]})" if modes and modes.get(name, name) != name else name
            color = shades[name] if name in shades else COLORS.get(name) or next(spare)
            ax.plot(keep, [means[i] for i in keep], "o--" if name in shades else "o-", label=label, linewidth=1.4,
                    markersize=4, color=color)
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=45, fontsize=8)
        ax.set_xlabel("reply position (1 = first token: the full model's in overfill mode)")
        ax.set_ylabel(ylabel)
        if key in SHARES:
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""The PNG figures the commands write (matplotlib, Agg backend: files only, no display).

- `plot_losses`: `overfill train`'s loss.png, training and validation loss by step;
- `write_plots`: `overfill bench`'s prefill/decode breakdown and one figure per sweep (paper Figs. 3-5);
- `plot_per_position`: `overfill eval`'s per_position.png, p(correct token) by reply position (paper Fig. 8).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

COLORS = {"overfill": "tab:green", "full": "tab:blue", "pruned": "tab:orange", "hf_generate": "tab:gray",
          "hf_assisted": "tab:purple"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics: list[dict], path: Path, title: str) -> Path:
    """Training loss per step (and a running mean) with validation loss on top; PNG via the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train (mean of {window})")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reply loss, nats (validation: tokens 2..N)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def write_plots(result: dict, out: Path) -> list[str]:
    """PNG figures (matplotlib Agg): the key point's prefill/decode bars, then one figure per sweep."""
    plt = _pyplot()

    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)

    key = result["key_point"]
    rows = key["rows"]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    names = list(rows)
    prefill_s = [rows[r]["prefill_s"]["median"] for r in names]
    decode_s = [rows[r]["decode_s"]["median"] for r in names]
    e2e = [rows[r]["e2e_s"] for r in names]
    ax.bar(names, prefill_s, color="tab:red", label="prefill + first token")
    ax.bar(names, decode_s, bottom=prefill_s, color=[COLORS.get(r, "tab:gray") for r in names], label="decode")
    ax.errorbar(names, [e["median"] for e in e2e], fmt="none", ecolor="black", capsize=4,
                yerr=[[e["median"] - e["q1"] for e in e2e], [e["q3"] - e["median"] for e in e2e]])
    for i, e in enumerate(e2e):
        ax.annotate(f"{e['median']:.2f}s", (i, e["q3"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds (median, IQR bars)")
    ax.set_title(f"batch {key['batch']}, prompt {key['prompt_len']}, {key['new_tokens']} new tokens")
    ax.legend(fontsize=8)
    save(fig, "breakdown.png")

    panels = {
        "new_tokens": (("e2e_s", "end-to-end latency (s)"), ("decode_tokens_per_s", "decode tokens/s")),
        "prompt_len": (("prefill_s", "prefill + first token (s)"), ("e2e_s", "end-to-end latency (s)")),
        "batch": (("tokens_per_s", "throughput, all rows (tokens/s)"), ("decode_ms_per_token", "decode step (ms)")),
    }
    labels = {"new_tokens": "new tokens", "prompt_len": "prompt tokens", "batch": "batch size"}
    for name, sweep in result["sweeps"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (metric, ylabel) in zip(axes, panels[name]):
            for mode, points in sweep["rows"].items():
                med = [p[metric]["median"] for p in points]
                ax.plot(sweep["values"], med, marker="o", color=COLORS.get(mode), label=mode)
                ax.fill_between(sweep["values"], [p[metric]["q1"] for p in points], [p[metric]["q3"] for p in points],
                                color=COLORS.get(mode), alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sweep["values"], [str(v) for v in sweep["values"]])
            ax.set_xlabel(labels[name])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fixed = ", ".join(f"{k.replace('_', ' ')} {sweep[k]}" for k in ("prompt_len", "batch", "new_tokens") if k in sweep)
        fig.suptitle(f"{labels[name]} sweep ({fixed}; median, IQR band)")
        save(fig, f"{name}.png")
    return files


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
                      min_count: int | None = None) -> Path:
    """Paper Figure 8: the correct token's mean probability (and mean NLL) by reply position, one line per model.

    Positions are grouped in doubling bins (position_bins); bins holding fewer than `min_count`
    tokens (default: a tenth of the replies, at least 1) are left out.
    """
    plt = _pyplot()

    panels = [("mean_prob", "mean p(correct token)")]
    if all("mean_nll" in pos for pos in positions.values()):
        panels.append(("mean_nll", "mean NLL of the correct token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    # Bins start at position 1 for every model, so bin i is the same positions for all; the longest
    # reply set names the ticks.
    ticks = max((position_bins(pos, "mean_prob")[0] for pos in positions.values()), key=len)
    for ax, (key, ylabel) in zip(axes[0], panels):
        spare = iter(["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
        for name, pos in positions.items():
            floor = min_count or max(1, math.ceil(0.1 * max(pos["count"])))
            _, means, counts = position_bins(pos, key)
            keep = [i for i, c in enumerate(counts) if c >= floor]
            label = f"{name} ({modes[name]})" if modes and modes.get(name, name) != name else name
            ax.plot(keep, [means[i] for i in keep], "o-", label=label, linewidth=1.4, markersize=4,
                    color=COLORS.get(name) or next(spare))
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=45, fontsize=8)
        ax.set_xlabel("reply position (1 = first token: the full model's in overfill mode)")
        ax.set_ylabel(ylabel)
        if key == "mean_prob":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Teacher-forced quality by reply position (paper Fig. 8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

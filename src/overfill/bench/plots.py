"""`overfill bench`'s figures: the key point's prefill/decode breakdown and one figure per sweep (paper Figs. 3-5)."""

from __future__ import annotations

from pathlib import Path

from overfill.plotting import COLORS, pyplot


def write_plots(result: dict, out: Path) -> list[str]:
    """PNG figures (matplotlib Agg): the key point's prefill/decode bars, then one figure per sweep."""
    plt = pyplot()

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

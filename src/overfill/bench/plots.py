"""`overfill bench`'s figures: the key point's prefill/decode breakdown and one figure per sweep (paper Figs. 3-5);
with --engine vllm, the breakdown per key batch for vLLM and our loop, and the load run's figure."""

from __future__ import annotations

from pathlib import Path

from overfill.plotting import COLORS, pyplot


def write_plots(result: dict, out: Path) -> list[str]:
    """PNG figures (matplotlib Agg): the key point's prefill/decode bars, then one figure per sweep."""
    plt = pyplot()
    files: list[str] = []
    save = _saver(plt, out, files)

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
    for name, sweep in result["sweeps"].items():
        save(_sweep_figure(plt, name, sweep, panels[name], line="median", band=("q1", "q3"), what="median, IQR band"),
             f"{name}.png")
    return files


def _saver(plt, out: Path, files: list[str]):
    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)

    return save


def _values(points: list[dict], metric: str, stat: str) -> list[float]:
    nan = float("nan")  # a missing value (vLLM: no decode time left after noise) leaves a gap
    return [nan if p[metric][stat] is None else p[metric][stat] for p in points]


LABELS = {"new_tokens": "new tokens", "prompt_len": "prompt tokens", "batch": "batch size"}


def _sweep_figure(plt, name: str, sweep: dict, panels, *, line: str, band: tuple[str, str], what: str):
    """One sweep, two panels: each mode's `line` statistic against the swept value, `band` shaded."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, ylabel) in zip(axes, panels):
        for mode, points in sweep["rows"].items():
            ax.plot(sweep["values"], _values(points, metric, line), marker="o", color=COLORS.get(mode), label=mode)
            ax.fill_between(sweep["values"], _values(points, metric, band[0]), _values(points, metric, band[1]),
                            color=COLORS.get(mode), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep["values"], [str(v) for v in sweep["values"]])
        ax.set_xlabel(LABELS[name])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fixed = ", ".join(f"{k.replace('_', ' ')} {sweep[k]}" for k in ("prompt_len", "batch", "new_tokens") if k in sweep)
    fig.suptitle(f"{LABELS[name]} sweep ({fixed}; {what})")
    return fig


def write_vllm_plots(result: dict, out: Path) -> list[str]:
    """`--engine vllm` figures: each key point's prefill/decode bars (vLLM and our loop), one figure per sweep.

    Lines are the best (fastest) repeat, the band reaches to the median (bench/vllm_run.py says why).
    """
    plt = pyplot()
    files: list[str] = []
    save = _saver(plt, out, files)

    keys = result["key_points"]
    if keys:  # none with --no-offline-runs
        bars = [[(f"{engine}\n{mode}", mode, row) for engine, rows in key["rows"].items() for mode, row in rows.items()]
                for key in keys]
        fig, axes = plt.subplots(1, len(keys), figsize=(max(1.3 * len(bars[0]) + 2, 5) * len(keys), 4), squeeze=False)
        for ax, key, key_bars in zip(axes[0], keys, bars):
            names = [b[0] for b in key_bars]
            prefill = [b[2]["prefill_s"]["best"] for b in key_bars]
            decode = [b[2]["decode_s"]["best"] for b in key_bars]
            ax.bar(names, prefill, color="tab:red", label="prefill + first token")
            ax.bar(names, decode, bottom=prefill, color=[COLORS.get(b[1], "tab:gray") for b in key_bars], label="decode")
            for i, b in enumerate(key_bars):
                e2e = b[2]["e2e_s"]
                ax.annotate(f"{e2e['best']:.2f}s", (i, e2e["best"]), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("seconds (best repeat)")
            ax.set_title(f"batch {key['batch']}, prompt {key['prompt_len']}, {key['new_tokens']} new tokens", fontsize=10)
            ax.tick_params(axis="x", labelsize=8)
            ax.legend(fontsize=8)
        save(fig, "breakdown.png")

    panels = {
        "new_tokens": (("e2e_s", "end-to-end latency (s)"), ("decode_tokens_per_s", "decode tokens/s")),
        "prompt_len": (("prefill_s", "prefill + first token (s)"), ("decode_ms_per_token", "decode step (ms)")),
        "batch": (("tokens_per_s", "throughput, all rows (tokens/s)"), ("decode_ms_per_token", "decode step (ms)")),
    }
    for name, sweep in result["sweeps"].items():
        save(_sweep_figure(plt, name, sweep, panels[name], line="best", band=("best", "median"),
                           what="vLLM, best repeat, band to the median"), f"{name}.png")
    if result.get("load"):
        save(_load_figure(plt, result["load"]), "load.png")
    return files


def _load_figure(plt, runs: list[dict]):
    """One row of panels per number of clients."""
    fig, grid = plt.subplots(len(runs), 3, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for axes, load in zip(grid, runs):
        rows = load["rows"]
        names = list(rows)
        for ax, (title, keys) in zip(axes, (("output tokens/s", ("output_tokens_per_s",)),
                                            ("TTFT (ms)", ("ttft_p50_ms", "ttft_p99_ms")),
                                            ("ITL (ms)", ("itl_p50_ms", "itl_p99_ms")))):
            width = 0.8 / len(keys)
            for j, key in enumerate(keys):
                xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
                ax.bar(xs, [rows[n][key] or 0 for n in names], width=width, color=[COLORS.get(n, "tab:gray") for n in names],
                       alpha=1.0 if j == 0 else 0.5, label=key.split("_")[1] if len(keys) > 1 else None)
            ax.set_xticks(range(len(names)), names)
            ax.set_title(f"{load['clients']} clients: {title}", fontsize=10)
            if len(keys) > 1:
                ax.legend(fontsize=8)
    first = runs[0]
    fig.suptitle(f"overfill serve under load: streaming clients for ~{first['seconds']} s each, "
                 f"prompt {first['prompt_len']}, {first['new_tokens']} new tokens")
    return fig

"""frontier.png: decode cost against quality, one labelled point per configuration (paper Figure 6's axes),
the frontier drawn through the configurations nothing beats on both."""

from __future__ import annotations

from pathlib import Path

from overfill.plotting import pyplot

KIND_COLORS = {"full": "tab:blue", "pruned": "tab:orange", "overfill": "tab:green", "refresh": "yellowgreen",
               "speculative": "tab:purple", "dtype": "teal", "vllm": "tab:cyan", "vllm speculative": "tab:pink"}


def _panels(points: list[dict]) -> list[tuple[str, str, bool]]:
    """(point key, y label, higher is better): agreement always; then reference NLL or accuracy where measured."""
    panels = [("top1", "top-1 agreement with the full model\n(teacher-forced on its greedy replies, tokens 2..N)", True)]
    if all(p.get("accuracy") is not None for p in points):
        panels.append(("accuracy", "final-answer accuracy", True))
    if all(p.get("nll") is not None for p in points):
        panels.append(("nll", "NLL of the reference replies (tokens 2..N)", False))
    else:
        panels.append(("first_divergence_mean", "tokens before the first divergence\nfrom the full model's reply (mean)", True))
    return panels


def plot_frontier(result: dict, path: Path) -> Path:
    plt = pyplot()
    points, front = result["points"], result["frontier"]
    panels = _panels(points)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, (key, label, higher) in zip(axes[0], panels):
        for p in points:
            if p.get(key) is None:
                continue
            ax.scatter(p["decode_ms_per_token"], p[key], color=KIND_COLORS.get(p["kind"], "gray"), s=36, zorder=3,
                       edgecolors="black" if p["name"] in front else "none")
            ax.annotate(p["name"], (p["decode_ms_per_token"], p[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if key == "top1":
            on_front = sorted((p for p in points if p["name"] in front), key=lambda p: p["decode_ms_per_token"])
            ax.step([p["decode_ms_per_token"] for p in on_front], [p[key] for p in on_front], where="post",
                    color="black", linewidth=0.8, alpha=0.6, label="frontier")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("decode ms/token (batch 1, lower is faster)")
        ax.set_ylabel(label + ("" if higher else ", lower is better"))
        ax.grid(alpha=0.3)
    env = result["environment"]
    fig.suptitle(f"Quality against decode cost, every configuration ({env['device']}, "
                 f"{result['decode_step']['compile'] and 'compiled' or 'eager'} decode step, for drafting and verifying alike)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""`overfill demo`: the paper's experiment at laptop scale, end to end, on what the project ships.

1. prune the bundled SmolLM2-135M-Instruct at ratio 0.45 (reused when already done);
2. write a bundled arithmetic instruction set with checkable answers (data/synthetic.py);
3. train the OverFill decoder (on the frozen full model's cache) and the pruned baseline (the
   same decoder standalone) with the same data, steps and schedule;
4. evaluate full / pruned / OverFill on held-out problems: reply NLL on tokens 2..N, the share of
   the pruned-to-full gap that OverFill closes, per-position accuracy (paper Figure 8), answers;
5. answer one prompt in the three modes with timings, and write report.md + PNGs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from overfill.atomic import atomic_write_text, check_writable
from overfill.errors import OverfillError
from overfill.zoo import DEFAULT_MODEL, resolve_model


@dataclass
class DemoConfig:
    model: str = DEFAULT_MODEL
    """Full model: a zoo name, a local HF folder or a hub id."""
    ratio: float = 0.45
    """Pruning ratio of the decoder (paper: 0.45)."""
    out: str = "runs/demo"
    """Report folder (report.md, PNGs, the pruned model, both trained decoders, evaluation)."""
    quick: bool = False
    """About 3 minutes instead of about 20: fewer steps and held-out problems."""
    steps: int | None = None
    """Optimizer steps for each of the two decoders (preset: 100; quick 8)."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 5e-4
    """Peak learning rate (cosine schedule, 5% warmup)."""
    heldout: int | None = None
    """Held-out problems to evaluate (preset: 48; quick 12)."""
    prompt: str = "Noor buys 4 books at 7 dollars each and pays with 40 dollars. How much change does Noor get?"
    """Prompt answered in the three modes at the end."""
    seed: int = 0
    """Seed for the data and the training order."""

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise OverfillError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.steps is None:
            self.steps = 8 if self.quick else 100
        if self.heldout is None:
            self.heldout = 12 if self.quick else 48
        if self.steps < 1 or self.heldout < 1 or self.batch_size < 1:
            raise OverfillError("--steps, --heldout and --batch-size must be at least 1")


def _pruned(config: DemoConfig, console) -> Path:
    from overfill.cli.report import print_prune_summary
    from overfill.prune import PruneConfig, prune

    folder = Path(config.out) / f"pruned-{config.ratio:g}"
    record_path = folder / "pruning.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("source_model") == config.model and record.get("config", {}).get("ratio") == config.ratio:
            console.print(f"reusing the pruned decoder in [bold]{folder}[/] (delete it to prune again)")
            print_prune_summary(console, record)
            return folder
    result = prune(PruneConfig(model=config.model, out=str(folder), ratio=config.ratio, force=True))
    print_prune_summary(console, result.record, folder)
    return folder


def _write_data(config: DemoConfig) -> tuple[Path, Path]:
    from overfill.data.synthetic import train_and_heldout

    train_rows, heldout_rows = train_and_heldout(config.steps * config.batch_size + 64, config.heldout, seed=config.seed)
    folder = Path(config.out) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, rows in zip(paths, (train_rows, heldout_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _train(config: DemoConfig, mode: str, decoder: Path, data: Path):
    from overfill.train import TrainConfig, train

    return train(TrainConfig(
        mode=mode, model=config.model, decoder=str(decoder), data=str(data), prompt_field="question",
        response_field="answer", val_size=16, out=str(Path(config.out) / f"train-{mode}"), lr=config.lr,
        warmup_ratio=0.05, batch_size=config.batch_size, max_steps=config.steps, eval_every=max(1, config.steps // 2),
        seed=config.seed, force=True,
    ))


def gap_closed(full: float, pruned: float, overfill: float) -> float:
    """Share of the pruned-to-full NLL gap that OverFill closes (1 = as good as the full model).

    NaN when there is no gap: on a narrow task the fine-tuned decoders can beat the frozen,
    untuned full model, and a "share" of a negative gap means nothing.
    """
    return (pruned - overfill) / (pruned - full) if pruned > full else float("nan")


def verdict(nll: dict[str, float], nll_all: dict[str, float], share: float) -> str:
    """One sentence comparing OverFill with the pruned baseline (and the full model, when that means something)."""
    head = (f"OverFill vs the pruned baseline: reply NLL {nll['overfill']:.3f} vs {nll['pruned']:.3f} on tokens 2..N, "
            f"{nll_all['overfill']:.3f} vs {nll_all['pruned']:.3f} on the whole reply (token 1 included)")
    if not math.isnan(share):
        return f"{head}; OverFill closes {share:.0%} of the pruned-to-full gap on tokens 2..N."
    return (f"{head}; both trained decoders beat the untuned full model ({nll['full']:.3f}) on this set, "
            "so there is no pruned-to-full gap to close.")


def _plot_losses(runs: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    from overfill.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in runs.items():
        if points:
            ax.plot(*zip(*points), "o-", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation NLL, reply tokens 2..N")
    ax.set_title("Same data, same steps: OverFill decoder vs pruned baseline")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(config: DemoConfig, console) -> dict:
    from overfill.evaluation import EvalConfig, evaluate
    from overfill.generation import GenerationConfig, generate
    from overfill.modeling import OverFillModel

    started = time.perf_counter()
    # Before twenty minutes of pruning and training, and before the report folder exists.
    out = check_writable(config.out, "--out")
    resolve_model(config.model)
    out.mkdir(parents=True, exist_ok=True)
    console.rule(f"1/5 prune {config.model} at ratio {config.ratio}")
    pruned_folder = _pruned(config, console)
    console.rule("2/5 data: bundled arithmetic problems with checkable answers")
    train_path, heldout_path = _write_data(config)
    console.print(f"{config.steps * config.batch_size} training examples used, {config.heldout} held out ({train_path.parent})")
    runs = {}
    for index, mode in enumerate(("overfill", "pruned"), start=3):
        what = "OverFill decoder (reads the frozen full model's cache)" if mode == "overfill" else "pruned baseline (the same decoder standalone)"
        console.rule(f"{index}/5 train the {what}: {config.steps} steps x {config.batch_size}")
        runs[mode] = _train(config, mode, pruned_folder, train_path)
    console.rule("5/5 evaluate on held-out problems")
    results = evaluate(EvalConfig(
        data=str(heldout_path), prompt_field="question", response_field="answer", out=str(out / "eval"),
        entries=(f"full=full:{runs['overfill'].checkpoint}", f"pruned=pruned:{runs['pruned'].checkpoint}",
                 f"overfill=overfill:{runs['overfill'].checkpoint}", "untrained=overfill"),
        model=config.model, decoder=str(pruned_folder), max_new_tokens=64, batch_size=8,
    ), console=console)
    nll = {name: m["nll"] for name, m in results["models"].items()}
    nll_all = {name: m["nll_all"] for name, m in results["models"].items()}
    share = gap_closed(nll["full"], nll["pruned"], nll["overfill"])
    loss_png = _plot_losses({f"{m} ({'trained on full cache' if m == 'overfill' else 'standalone'})": r.val_losses
                             for m, r in runs.items()}, out / "validation_loss.png")

    # Each mode with the model that was trained for it: pruned = the standalone baseline's decoder.
    checkpoints = {"full": runs["overfill"].checkpoint, "pruned": runs["pruned"].checkpoint,
                   "overfill": runs["overfill"].checkpoint}
    pairs = {path: OverFillModel.from_pretrained(path) for path in set(checkpoints.values())}
    replies = {mode: generate(pairs[path], config.prompt, GenerationConfig(mode=mode, max_new_tokens=64))[0]
               for mode, path in checkpoints.items()}
    table = Table(title="the same prompt, three ways (pruned: the baseline; overfill: the OverFill decoder)",
                  header_style="bold", show_lines=True)
    for column in ("mode", "prefill s", "decode tok/s", "reply"):
        table.add_column(column)
    for mode, reply in replies.items():
        table.add_row(mode, f"{reply.prefill_s:.2f}", f"{reply.decode_tokens_per_s:.1f}", reply.text.strip())
    console.print(f"[bold]prompt:[/] {config.prompt}")
    console.print(table)

    seconds = time.perf_counter() - started
    summary = {
        "config": asdict(config), "nll": nll, "nll_all": nll_all, "gap_closed": None if math.isnan(share) else share,
        "verdict": verdict(nll, nll_all, share), "seconds": round(seconds, 1),
        "train": {m: {"steps": r.steps, "examples": r.examples, "seconds": round(r.seconds, 1), "val_loss": r.val_loss}
                  for m, r in runs.items()},
        "accuracy": {n: m.get("answers", {}).get("accuracy") for n, m in results["models"].items()},
        "replies": {m: r.as_dict() for m, r in replies.items()},
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1) + "\n")
    _write_report(out, summary, results, loss_png)
    console.print(
        f"[bold]reply NLL on tokens 2..N[/]: full {nll['full']:.3f}, pruned baseline {nll['pruned']:.3f}, "
        f"OverFill {nll['overfill']:.3f}, untrained decoder {nll['untrained']:.3f}"
    )
    console.print(f"[bold]{summary['verdict']}[/]")
    console.print(f"report: [bold]{out / 'report.md'}[/]; demo finished in {seconds / 60:.1f} min")
    return summary


def _write_report(out: Path, summary: dict, results: dict, loss_png: Path) -> None:
    rows = []
    for name, m in results["models"].items():
        acc = m.get("answers", {}).get("accuracy")
        rows.append(f"| {name} | {m['mode']} | {m['nll']:.3f} | {m['nll_all']:.3f} | {m['ppl']:.2f} | {m['top1']:.1%} | "
                    f"{'-' if acc is None else f'{acc:.0%}'} |")
    cfg = summary["config"]
    lines = [
        "# OverFill demo report", "",
        f"Full model `{cfg['model']}`, decoder pruned at ratio {cfg['ratio']}; both decoders trained for "
        f"{cfg['steps']} steps x {cfg['batch_size']} examples (lr {cfg['lr']}, cosine) on the bundled arithmetic set; "
        f"{cfg['heldout']} held-out problems.", "",
        "| model | mode | reply NLL (tokens 2..N) | whole-reply NLL | PPL (2..N) | top-1 (2..N) | answer accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        f"**{summary['verdict']}**", "",
        "In OverFill the first reply token comes from the full model: tokens 2..N measure the decoder, the whole "
        "reply what a user gets. The full model here is the frozen, untuned one OverFill prefills with.", "",
        f"![validation loss]({loss_png.name})", "", "![per-position probability](eval/per_position.png)", "",
        f"Wall time: {summary['seconds'] / 60:.1f} min.",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")

"""`overfill demo`: the general-purpose recipe at demo scale, end to end, on what the project ships.

1. prune the bundled SmolLM2-135M-Instruct (ratio 0.25 by default; reused when already done);
2. compose general instructions of many kinds, training and held-out apart (prompts.py);
3. the full model's own greedy replies to the training prompts (`overfill distill`; sequence-level
   distillation), cached in the out folder so a rerun reuses them;
4. train the OverFill decoder (on the frozen full model's cache) and the pruned baseline (the same
   decoder standalone) on those replies, with the same steps, schedule and --loss;
5. the frontier on held-out prompts (`overfill frontier`): each configuration's teacher-forced top-1
   agreement with the full model's own greedy replies and the NLL of them (by reply position too),
   against its decode ms/token: full, pruned, OverFill, OverFill with prefill refresh, speculative
   decoding (the decoder drafts, the full model verifies: its exact replies);
6. answer a few held-out prompts with each of them, timed, and write report.md + PNGs.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from itertools import islice
from pathlib import Path

from overfill.atomic import atomic_write_text, check_writable
from overfill.demo.config import DemoConfig
from overfill.demo.prompts import chat_prompts, demo_prompts, write_prompts
from overfill.demo.report import CHAT_MODES, gap_closed, print_chat, print_summary, verdict, write_report
from overfill.loading import resolve_model

VAL_SIZE = 16  # held-back training replies for the validation curve (a quarter of them at most)
REFRESH_EVERY = 8  # the demo's refresh row: the full model re-reads every 8 reply tokens
DRAFT_TOKENS = 3  # the demo's speculative row: 3 drafts per pass of the full model
TIMING_PROMPTS = 4  # held-out prompts whose replies time each configuration on the frontier


def _pruned(config: DemoConfig, console) -> Path:
    from overfill.prune import PruneConfig, prune
    from overfill.prune_report import print_prune_summary

    folder = Path(config.out) / f"pruned-{config.ratio:g}"
    record_path = folder / "pruning.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):  # none yet, or one that cannot be read or parsed: pruned (again) below
        record = None
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        if record.get("source_model") == config.model and record["config"].get("ratio") == config.ratio:
            console.print(f"reusing the pruned decoder in [bold]{folder}[/] (delete it to prune again)")
            print_prune_summary(console, record)
            return folder
    result = prune(PruneConfig(model=config.model, out=str(folder), ratio=config.ratio, force=True, device=config.device))
    print_prune_summary(console, result.record, folder)
    return folder


def _slug(model: str) -> str:
    return Path(model).name or model.replace("/", "_")


def _replies(config: DemoConfig, prompts_path: Path, console):
    """The full model's replies to the first --prompts training prompts, in a file named by what they depend on.

    distill continues a file made with the same settings (a longer --prompts adds replies, a shorter
    one reads the first ones) and refuses one made otherwise, so the name carries the rest: model,
    prompt order (seed), length and engine.
    """
    from overfill.distill import DistillConfig, distill

    settings = DistillConfig(data=str(prompts_path), out=str(prompts_path.parent / "replies.jsonl"), model=config.model,
                             engine=config.engine, max_new_tokens=config.max_new_tokens, limit=config.prompts,
                             device=config.device)
    engine = settings.resolved_engine()  # what --engine auto means here; the file's real name follows
    path = prompts_path.parent / f"replies-{_slug(config.model)}-seed{config.seed}-{config.max_new_tokens}tok-{engine}.jsonl"
    result = distill(replace(settings, out=str(path)))
    console.print(result.summary())
    return path, result


def first_replies(path: Path, count: int, tokenizer, max_new_tokens: int) -> tuple[list[dict], int, int]:
    """(the first `count` records, how many of their replies ended before the length limit, how many were cut there).

    A cut reply has max_new_tokens tokens and no end-of-turn token; one that stopped has at most
    max_new_tokens - 1 before its end-of-turn token, counted as training tokenizes it (empty replies,
    which training skips, count as neither).
    """
    from overfill.data import split_messages

    with open(path, encoding="utf-8") as file:
        records = [json.loads(line) for line in islice(file, count)]
    lengths = [len(e.target_ids) - 1 for r in records if (e := split_messages(tokenizer, r["messages"])) is not None]
    cut = sum(1 for n in lengths if n >= max_new_tokens)
    return records, len(lengths) - cut, cut


def _train(config: DemoConfig, mode: str, decoder: Path, data: Path, val_size: int):
    from overfill.train import TrainConfig, train

    return train(TrainConfig(
        # Training appends the end-of-turn token to every reply; keeping max_new_tokens of them drops it from
        # exactly the replies cut there, so no decoder learns to end its turn mid-sentence.
        mode=mode, model=config.model, decoder=str(decoder), data=str(data), val_size=val_size, max_target=config.max_new_tokens,
        out=str(Path(config.out) / f"train-{mode}"), lr=config.lr, warmup_ratio=0.05, batch_size=config.batch_size,
        max_steps=config.steps, eval_every=max(1, config.steps // 2), seed=config.seed, loss=config.loss, force=True,
        device=config.device,
    ))


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


def chat_settings(max_new_tokens: int) -> dict:
    """The chat comparison's rows: the dial from the pruned model's cost to the full model's exact replies."""
    from overfill.generation import GenerationConfig

    return {"full": GenerationConfig(mode="full", max_new_tokens=max_new_tokens),
            "overfill": GenerationConfig(mode="overfill", max_new_tokens=max_new_tokens),
            "refresh": GenerationConfig(mode="overfill", refresh_every=REFRESH_EVERY, max_new_tokens=max_new_tokens),
            "speculative": GenerationConfig(mode="speculative", draft_tokens=DRAFT_TOKENS, max_new_tokens=max_new_tokens),
            "pruned": GenerationConfig(mode="pruned", max_new_tokens=max_new_tokens)}


def chat(checkpoints: dict[str, Path], prompts: list[str], max_new_tokens: int, device: str = "cpu") -> list[dict]:
    """Each prompt answered greedily by each row of `chat_settings`, one at a time (batch 1), so each reply's timing
    is its own. Each row runs on the model trained for it: pruned = the standalone baseline's decoder.
    """
    from dataclasses import replace as with_

    from overfill.generation import generate
    from overfill.model_source import ModelSource

    settings = chat_settings(max_new_tokens)
    models = {path: ModelSource(checkpoint=str(path), device=device).load() for path in set(checkpoints.values())}
    for row in CHAT_MODES:  # a first call pays one-off costs (allocations, kernel choice) that no reply should carry
        generate(models[checkpoints[row]], prompts[0], with_(settings[row], max_new_tokens=2))
    return [{"prompt": prompt,
             "replies": {row: generate(models[checkpoints[row]], prompt, settings[row])[0].as_dict() for row in CHAT_MODES}}
            for prompt in prompts]


def run_demo(config: DemoConfig, console) -> dict:
    from transformers import AutoTokenizer

    from overfill.frontier import FrontierConfig, run_frontier

    started = time.perf_counter()
    phases: dict[str, float] = {}

    @contextmanager
    def phase(name: str, title: str):
        console.rule(title)
        t0 = time.perf_counter()
        yield
        phases[name] = round(time.perf_counter() - t0, 1)

    # Before twenty minutes of work, and before the report folder exists.
    out = check_writable(config.out, "--out")
    folder = resolve_model(config.model)
    out.mkdir(parents=True, exist_ok=True)
    with phase("prune", f"1/6 prune {config.model} at ratio {config.ratio}"):
        pruned_folder = _pruned(config, console)
    with phase("prompts", "2/6 prompts: general instructions of many kinds, held-out topics apart"):
        train_prompts, heldout_prompts = demo_prompts(config.seed)
        # The whole training pool, so that any --prompts reads the same file (distill --limit takes its first N).
        prompts_path = write_prompts(out / "data" / f"train-prompts-seed{config.seed}.jsonl", train_prompts)
        heldout_path = write_prompts(out / "data" / f"heldout-prompts-seed{config.seed}.jsonl", heldout_prompts[: config.heldout])
        families = len({p.family for p in train_prompts[: config.prompts]})
        console.print(f"{config.prompts} training prompts of {families} kinds (of {len(train_prompts)} composed), "
                      f"{config.heldout} held out on other topics ({prompts_path.parent})")
    with phase("distill", f"3/6 the full model's own replies to the training prompts (cached in {prompts_path.parent})"):
        replies_path, distilled = _replies(config, prompts_path, console)
        records, ended, cut = first_replies(replies_path, config.prompts, AutoTokenizer.from_pretrained(folder), config.max_new_tokens)
        train_path = atomic_write_text(out / "data" / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        console.print(f"{ended} replies ended within {config.max_new_tokens} tokens; {cut} were cut there "
                      "and are learnt without an end of turn")
    runs = {}
    val_size = min(VAL_SIZE, len(records) // 4)
    for index, mode in enumerate(("overfill", "pruned"), start=4):
        what = "OverFill decoder (reads the frozen full model's cache)" if mode == "overfill" else "pruned baseline (the same decoder standalone)"
        with phase(f"train {mode}", f"{index}/6 train the {what}: {config.steps} steps x {config.batch_size}, --loss {config.loss}"):
            runs[mode] = _train(config, mode, pruned_folder, train_path, val_size)
    with phase("frontier", f"6/6 the frontier: agreement with the full model on {config.heldout} held-out prompts, "
                           "against decode cost"):
        frontier = run_frontier(FrontierConfig(
            data=str(heldout_path), out=str(out / "frontier"), nll=False, max_new_tokens=config.max_new_tokens, batch_size=8,
            entries=(f"full=full:{runs['overfill'].checkpoint}", f"pruned=pruned:{runs['pruned'].checkpoint}",
                     f"overfill=overfill:{runs['overfill'].checkpoint}"),
            refresh_every=(REFRESH_EVERY,), draft_tokens=(DRAFT_TOKENS,), drafters=("overfill",), decoder_dtypes=(),
            timing_prompts=min(TIMING_PROMPTS, config.heldout), repeats=1, model=config.model, device=config.device,
        ), console)
    results = json.loads((out / "frontier" / "quality" / "results.json").read_text())
    agreement = {name: {"mode": m["mode"], "mean_reply_tokens": m["mean_reply_tokens"], **m["agreement"]}
                 for name, m in results["models"].items()}
    share = gap_closed(agreement["full"]["nll"], agreement["pruned"]["nll"], agreement["overfill"]["nll"])
    loss_png = _plot_losses({f"{m} ({'trained on full cache' if m == 'overfill' else 'standalone'})": r.val_losses
                             for m, r in runs.items()}, out / "validation_loss.png")

    with phase("chat", "chat: held-out prompts answered by the full model, OverFill (plain, with refresh, speculative) "
                       "and the pruned baseline"):
        questions = [p.text for p in chat_prompts(heldout_prompts)] + ([config.prompt] if config.prompt else [])
        ours = runs["overfill"].checkpoint
        turns = chat({"full": ours, "overfill": ours, "refresh": ours, "speculative": ours, "pruned": runs["pruned"].checkpoint},
                     questions, config.max_new_tokens, config.device)
        print_chat(console, turns)

    summary = {
        "config": asdict(config),
        "data": {"prompts": config.prompts, "families": families, "ended": ended, "cut": cut,
                 "replies": str(replies_path), "engine": distilled.engine, "generated": distilled.written,
                 "reused": distilled.already, "heldout": config.heldout},
        "train": {m: {"steps": r.steps, "examples": r.examples, "seconds": round(r.seconds, 1), "val_loss": r.val_loss,
                      "s_per_step": round(1 / r.steps_per_s, 2) if r.steps_per_s else None,
                      "val_first": r.val_losses[0][1] if r.val_losses else None} for m, r in runs.items()},
        "agreement": agreement, "gap_closed": None if math.isnan(share) else share,
        "verdict": verdict(agreement, share, config.heldout), "chat": turns, "phases": phases,
        "frontier": {"points": frontier["points"], "frontier": frontier["frontier"], "decode_step": frontier["decode_step"]},
        "seconds": round(time.perf_counter() - started, 1), "validation_png": loss_png.name,
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1) + "\n")
    write_report(out, summary)
    print_summary(console, summary)
    console.print(f"report: [bold]{out / 'report.md'}[/]; demo finished in {summary['seconds'] / 60:.1f} min")
    return summary

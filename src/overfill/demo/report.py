"""What `overfill demo` shows: agreement first (terminal lines and report.md), then the chat comparison, training and timings.

Everything here reads the summary `run.py` writes to demo.json, so the report can be rebuilt (and
tested) from that file alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from overfill.atomic import atomic_write_text
from overfill.terminal_tables import readable

LABELS = {"full": "full model", "overfill": "OverFill", "pruned": "pruned baseline", "untrained": "untrained decoder",
          "refresh": "OverFill, refresh every 8", "speculative": "speculative (decoder drafts 3, full model verifies)"}
# The chat comparison's order: the dial from the full model's replies to the pruned model's cost.
CHAT_MODES = ("full", "speculative", "refresh", "overfill", "pruned")


def gap_closed(full: float, pruned: float, overfill: float) -> float:
    """Share of the pruned-to-full gap that OverFill closes (1 = as good as the full model).

    NaN when there is no gap (the pruned baseline already matches or beats the full model), where a
    "share" of it means nothing.
    """
    return (pruned - overfill) / (pruned - full) if pruned > full else float("nan")


def verdict(agreement: dict[str, dict], share: float, heldout: int) -> str:
    """One sentence comparing OverFill with the pruned baseline on the full model's own replies."""
    o, p = agreement["overfill"], agreement["pruned"]
    head = (f"On {heldout} held-out prompts, teacher-forced on the full model's own greedy replies, OverFill picks the "
            f"full model's token {o['top1']:.1%} of the time vs {p['top1']:.1%} for the pruned baseline (reply tokens "
            f"2..N), at NLL {o['nll']:.3f} vs {p['nll']:.3f}")
    if math.isnan(share):
        return f"{head}; the pruned baseline is already at the full model's NLL ({agreement['full']['nll']:.3f}), so there is no gap to close."
    return f"{head}: OverFill closes {share:.0%} of the pruned-to-full NLL gap (full model {agreement['full']['nll']:.3f})."


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def agreement_rows(agreement: dict[str, dict]) -> list[str]:
    rows = []
    for name, a in agreement.items():
        rows.append(f"| {LABELS.get(name, name)} | {a['mode']} | {_pct(a['top1'])} | {a['nll']:.3f} | {_pct(a.get('token_match'))} | "
                    f"{a.get('first_divergence_mean', float('nan')):.1f} | {a.get('mean_reply_tokens', float('nan')):.1f} |")
    return rows


def print_summary(console, summary: dict) -> None:
    for name, a in summary["agreement"].items():
        console.print(f"[bold]{LABELS.get(name, name)}[/]: top-1 agreement with the full model {a['top1']:.1%}, "
                      f"NLL of its tokens {a['nll']:.3f} (reply tokens 2..N, teacher forced)")
    console.print(f"[bold]{summary['verdict']}[/]")


# ---------------------------------------------------------------- the chat comparison


def _timing(reply: dict) -> str:
    seconds, n = reply["prefill_s"] + reply["decode_s"], reply["new_tokens"]
    return f"{n} token{'' if n == 1 else 's'} in {seconds:.1f} s, {reply['decode_tokens_per_s']:.0f} tok/s decoding"


def print_chat(console, chat: list[dict]) -> None:
    for i, turn in enumerate(chat, start=1):
        table = Table(title=f"{i}. {turn['prompt']}", title_justify="left", header_style="bold", show_lines=True)
        for column in ("model", "time", "reply"):
            table.add_column(column, overflow="fold")
        for mode, reply in turn["replies"].items():
            table.add_row(LABELS[mode], _timing(reply), reply["text"].strip())
        console.print(readable(table))


def chat_markdown(chat: list[dict]) -> list[str]:
    lines = []
    for i, turn in enumerate(chat, start=1):
        lines += [f"### {i}. {turn['prompt']}", ""]
        for mode, reply in turn["replies"].items():
            quoted = [f"> {line}" if line.strip() else ">" for line in (reply["text"].strip() or "(empty reply)").splitlines()]
            lines += [f"**{LABELS[mode]}** ({_timing(reply)}):", "", *quoted, ""]
    return lines


def frontier_markdown(frontier: dict) -> list[str]:
    points = sorted(frontier["points"], key=lambda p: p["decode_ms_per_token"])
    front = set(frontier["frontier"])
    step = "compiled" if frontier["decode_step"]["compile"] else "eager"
    return [f"Decode ms per token of each configuration's own replies (batch 1, {step} decode step; in speculative "
            "decoding the full model verifies each block of drafts eagerly), measured side by side; agreement as above. "
            "Bold: on the frontier (nothing is both cheaper and closer to the full model).", "",
            "| configuration | decode ms/token | x the full model's | top-1 agreement (2..N) | greedy: tokens before the "
            "first divergence | drafts accepted |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *[f"| {'**' + p['name'] + '**' if p['name'] in front else p['name']} | {p['decode_ms_per_token']:.1f} | "
              f"{_num(p['decode_ms_vs_full'], 2)} | {_pct(p['top1'])} | {_num(p['first_divergence_mean'], 1)} | "
              f"{_pct(p['acceptance_rate'])} |" for p in points]]


# ---------------------------------------------------------------- report.md


def write_report(out: Path, summary: dict) -> Path:
    cfg, data = summary["config"], summary["data"]
    train = summary["train"]
    lines = [
        "# OverFill demo report", "",
        f"Full model `{cfg['model']}`, decoder pruned at ratio {cfg['ratio']}. The full model answered {data['prompts']} "
        f"training prompts of {data['families']} kinds (greedy, up to {cfg['max_new_tokens']} tokens: {data['ended']} "
        f"replies ended within that, {data['cut']} were cut and are learnt without an end of turn); both decoders "
        f"learn these replies, {cfg['steps']} steps x {cfg['batch_size']} examples each with `--loss {cfg['loss']}` "
        f"(lr {cfg['lr']}, cosine). "
        f"{cfg['heldout']} held-out prompts, on topics no training prompt mentions, measure them.", "",
        "## Agreement with the full model on held-out prompts", "",
        "| model | mode | top-1 agreement (tokens 2..N) | NLL of the full model's tokens (2..N) | greedy: same token (2..N) "
        "| greedy: tokens before the first divergence | greedy: reply tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *agreement_rows(summary["agreement"]), "",
        f"**{summary['verdict']}**", "",
        "Top-1 agreement and NLL are teacher-forced: each model reads the full model's own greedy reply and is scored "
        "on it token by token, so one early difference does not spoil the rest. Token 1 is left out: in OverFill it "
        "is the full model's by construction. The greedy columns compare each model's own greedy reply with the "
        "full model's.", "",
        "![agreement by reply position](frontier/quality/agreement_per_position.png)", "",
        "## The dial: every configuration's quality against its decode cost", "",
        *frontier_markdown(summary["frontier"]), "",
        "![the frontier](frontier/frontier.png)", "",
        "## Chat: held-out prompts, five ways", "",
        "Greedy replies; OverFill = the full model reads the prompt and picks token 1, the decoder writes the rest; "
        "with refresh, the full model re-reads the reply every 8 tokens and picks the next one; speculative = the "
        "decoder drafts 3 tokens, the full model checks them in one pass and keeps what it would have written itself "
        "(the full model's reply exactly); pruned baseline = the same size of decoder alone.", "",
        *chat_markdown(summary["chat"]),
        "## Training", "",
        "| decoder | steps x batch | validation NLL, first -> last | seconds | seconds per step |",
        "| --- | --- | ---: | ---: | ---: |",
        *[f"| {LABELS[m]} | {t['steps']} x {cfg['batch_size']} | {_num(t['val_first'])} -> {_num(t['val_loss'])} | "
          f"{t['seconds']:.0f} | {_num(t.get('s_per_step'), 2)} |" for m, t in train.items()], "",
        "Validation NLL: on reply tokens 2..N of held-back training replies, the same measure for both decoders.", "",
        "![validation loss](validation_loss.png)", "",
        "## Where the time went", "",
        *[f"- {phase}: {seconds:.0f} s" for phase, seconds in summary["phases"].items()], "",
        f"Wall time: {summary['seconds'] / 60:.1f} min.",
    ]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")

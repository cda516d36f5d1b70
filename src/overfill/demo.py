"""`overfill demo`: the whole idea on the bundled model, in a couple of minutes.

Prune the full model (or reuse an earlier prune with the same settings), then answer one prompt
three ways through the same generation loop: full model alone, pruned model alone, and OverFill
(full prefill + first token, pruned decoder for the rest), with their timings side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from overfill.generation import GenerationConfig, generate
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune
from overfill.report import print_prune_summary


def pruned_folder(model: str, ratio: float, out_dir: str, console) -> Path:
    folder = Path(out_dir) / f"pruned-{ratio:g}"
    record_path = folder / "pruning.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("source_model") == model and record.get("config", {}).get("ratio") == ratio:
            console.print(f"reusing the pruned model in [bold]{folder}[/] (delete it to prune again)")
            print_prune_summary(console, record)
            return folder
    console.rule(f"1. prune {model} at ratio {ratio}")
    result = prune(PruneConfig(model=model, out=str(folder), ratio=ratio, force=True))
    print_prune_summary(console, result.record, folder)
    return folder


def run_demo(*, model: str, ratio: float, prompt: str, max_new_tokens: int, out_dir: str, console) -> dict:
    started = time.perf_counter()
    folder = pruned_folder(model, ratio, out_dir, console)
    console.rule("2. the same prompt, three ways")
    pair = OverFillModel.from_pair(model, str(folder))
    console.print(f"[bold]prompt:[/] {prompt}")
    table = Table(show_header=True, header_style="bold", show_lines=True)
    for column in ("mode", "prefill s", "decode s", "decode tok/s", "reply"):
        table.add_column(column, justify="right" if column != "reply" and column != "mode" else "left")
    replies = {}
    for mode in ("full", "pruned", "overfill"):
        reply = generate(pair, prompt, GenerationConfig(mode=mode, max_new_tokens=max_new_tokens))[0]
        replies[mode] = reply
        table.add_row(mode, f"{reply.prefill_s:.2f}", f"{reply.decode_s:.2f}", f"{reply.decode_tokens_per_s:.1f}", reply.text.strip())
    console.print(table)
    console.print(
        "The pruned decoder is untrained here, so 'pruned' and 'overfill' replies are poor; "
        "`overfill train` teaches the decoder to continue the full model's cache."
    )
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return replies

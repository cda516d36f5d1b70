"""`overfill frontier`: the quality-latency frontier of every configuration a user can pick (paper §6.1's
Pareto view, Figure 6's axes), for one checkpoint and one file of prompts.

A configuration is an `overfill eval` entry: full, the pruned baseline (given its own checkpoint),
OverFill, OverFill with prefill refresh every K tokens, speculative decoding with the decoder
drafting K tokens (on the full model's cache, or on its own), and OverFill with its decoder in
another dtype. Each gets

- its quality, from one `overfill eval` run (quality/): agreement with the full model's own greedy
  replies (teacher-forced top-1 over tokens 2..N, tokens before the first divergence) and, where
  the file has reference replies, their NLL and final-answer accuracy;
- its decode cost (timing.py): ms per decoded token of its own replies to the first prompts, batch
  1, every configuration interleaved in one run, on the decode step the run decides (compiled or
  eager, printed); speculative configurations draft on that step, and the full model verifies each block
  of drafts on a step of the same kind (one compiled pass over the block when compiling).

Both halves are saved as they finish and reused by a rerun with the same settings (resumable).
Writes frontier.json and frontier.png; prints the table and the configurations on the frontier.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from overfill.atomic import atomic_write_text, check_writable
from overfill.bench.results import environment
from overfill.decode_step import compile_seconds
from overfill.devices import decide_compile
from overfill.evaluation import EvalConfig, evaluate
from overfill.evaluation.config import ModelEntry, parse_entry
from overfill.frontier.config import FrontierConfig
from overfill.frontier.plots import plot_frontier
from overfill.frontier.report import print_frontier
from overfill.frontier.timing import time_entries
from overfill.interleaved import paired_ratio
from overfill.modeling import OverFillModel

EVAL_FIELDS = tuple(f.name for f in fields(EvalConfig) if f.name != "out")
TIMING_FIELDS = ("timing_prompts", "repeats", "warmup")


def run_frontier(config: FrontierConfig, console) -> dict:
    started = time.perf_counter()
    config.check_files()  # the held-out file, before any model loads
    out = check_writable(config.out, "--out")
    entries = config.model_entries()
    quality = measure_quality(config, console, out / "quality")
    timing = measure_timing(config, entries, console, out)
    points = frontier_points(entries, quality, timing)
    if config.vllm:
        points += vllm_frontier_points(measure_vllm(config, entries, quality, console, out), points)
    result = {"config": asdict(config), "environment": timing["environment"], "data": quality["data"],
              "decode_step": timing["decode_step"], "points": points, "frontier": pareto(points),
              "seconds": round(time.perf_counter() - started, 1)}
    result["files"] = ["frontier.json", plot_frontier(result, out / "frontier.png").name, "timing.json",
                       *(["vllm.json"] if config.vllm else []), "quality/"]
    atomic_write_text(out / "frontier.json", json.dumps(result, indent=1) + "\n")
    print_frontier(console, result, out)
    return result


def _settings(config: FrontierConfig, names) -> dict:
    """The settings a saved half was made with, as JSON reads them back (tuples become lists), and the state of
    the folders its models came from (a checkpoint trained again under the same name is measured again)."""
    folders = {f for e in config.model_entries() for f in (config.source_of(e).checkpoint, config.source_of(e).decoder) if f}
    return json.loads(json.dumps({**{name: getattr(config, name) for name in names},
                                  "folders": {f: _stamp(Path(f)) for f in sorted(folders)}}))


def _saved(path: Path, key: str, settings: dict, console) -> dict | None:
    """A half saved by an earlier run with these very settings (under `key`), or None: measure it again."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):  # none, or one that cannot be read or parsed: measured again, as if there were none
        return None
    if not isinstance(previous, dict) or previous.get(key) != settings:
        return None
    console.print(f"reusing {path} (same settings, same checkpoints)")
    return previous


def _stamp(folder: Path) -> list:
    """(name, size, modification time) of every file under `folder`: what changes when it is written again."""
    return sorted([str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def measure_quality(config: FrontierConfig, console, folder: Path) -> dict:
    """`overfill eval` over every configuration, into `folder`; a finished run with the same settings is reused."""
    saved = folder / "results.json"
    if (previous := _saved(saved, "frontier_settings", _settings(config, EVAL_FIELDS), console)) is not None:
        return previous
    # Greedy speculative replies are the full model's own, token for token (tested), so the quality run does not
    # generate them again: batched, a speculative batch keeps only the drafts every row agrees on, which would cost
    # minutes and say nothing new. Their acceptance comes from the timed replies (batch 1, real prompts).
    quality_config = config.view(EvalConfig, out=str(folder), draft_tokens=(),
                                 entries=tuple(e for e in config.entries if not parse_entry(e).draft_tokens))
    console.print(f"[bold]quality[/]: {len(quality_config.model_entries())} configurations (speculative ones are the full "
                  f"model's replies), `overfill eval` into {folder}")
    results = evaluate(quality_config, console)
    results["frontier_settings"] = _settings(config, EVAL_FIELDS)  # what a rerun compares with its own
    atomic_write_text(saved, json.dumps(results, indent=1) + "\n")
    return results


def measure_timing(config: FrontierConfig, entries: list[ModelEntry], console, out: Path) -> dict:
    """Every configuration's decode ms/token on the first --timing-prompts prompts, interleaved; saved to
    timing.json, which a rerun with the same settings reuses."""
    saved, settings = out / "timing.json", _settings(config, EVAL_FIELDS + TIMING_FIELDS)
    if (previous := _saved(saved, "settings", settings, console)) is not None:
        return previous
    models = load_models(config, entries, console)
    any_model = next(iter(models.values()))
    contexts = [e.context_ids for e in config.held_out(any_model.tokenizer).examples[: config.timing_prompts]]
    device = any_model.full.device
    runs = len(entries) * len(contexts) * (config.repeats + config.warmup)
    compile, why = decide_compile(config.compile, device, runs * config.max_new_tokens)
    console.print(f"[bold]timing[/]: {len(entries)} configurations x {len(contexts)} prompts x {config.repeats} rounds, "
                  f"batch 1, up to {config.max_new_tokens} new tokens; [dim]{escape(why)}[/]")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with torch.inference_mode(), Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("warming up", total=len(entries) * len(contexts) * config.repeats)
        rows = time_entries(models, entries, contexts, max_new_tokens=config.max_new_tokens, compile=compile,
                            repeats=config.repeats, warmup=config.warmup,
                            advance=lambda text: progress.update(task, advance=1, description=f"timing {text}"))
    timing = {"settings": settings, "environment": environment(config.dtype, device),
              "decode_step": {"compile": compile, "why": why},
              "compile_seconds": {name: seconds for name, m in models.items() if (seconds := compile_seconds(m.decoder))},
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "timing.json", json.dumps(timing, indent=1) + "\n")
    return timing


def measure_vllm(config: FrontierConfig, entries: list[ModelEntry], quality: dict, console, out: Path) -> dict:
    """vllm_rows.vllm_points on the quality prompts, against the full model's replies in our loop; saved to
    vllm.json, which a rerun with the same settings reuses."""
    from transformers import AutoTokenizer

    from overfill.evaluation.answers import answer_accuracy
    from overfill.frontier.vllm_rows import vllm_points
    from overfill.vllm.export import engine_model

    saved, settings = out / "vllm.json", _settings(config, EVAL_FIELDS + TIMING_FIELDS)
    if (previous := _saved(saved, "settings", settings, console)) is not None:
        return previous
    full = next(e for e in entries if e.mode == "full")
    folder = engine_model(config.source_of(full), "full").path
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    contexts = [e.context_ids for e in config.held_out(tokenizer).examples]
    replies = [json.loads(line) for line in (out / "quality" / "replies.jsonl").read_text().splitlines()]
    by_index = {r["index"]: r for r in replies if r["model"] == full.name}
    reference = [by_index[i]["token_ids"] for i in range(len(contexts))]
    stop_ids = set(quality["models"][full.name]["stop_ids"])  # what ended the replies in our loop
    console.print(f"[bold]vLLM[/]: the same {len(contexts)} prompts, one engine at a time, at vLLM's defaults")
    rows = vllm_points(config, entries, contexts, reference, stop_ids, console)
    answers = [by_index[i]["reference_answer"] for i in range(len(contexts))]
    for row in rows.values():
        made = row.pop("replies")
        texts = [tokenizer.decode([t for t in r if t not in stop_ids], skip_special_tokens=True) for r in made]
        if any(a is not None for a in answers):
            row["answers"] = answer_accuracy(texts, [tokenizer.decode(r[:1], skip_special_tokens=True) for r in made], answers)
    result = {"settings": settings, "rows": rows}
    atomic_write_text(saved, json.dumps(result, indent=1) + "\n")
    return result


def vllm_frontier_points(vllm: dict, points: list[dict]) -> list[dict]:
    """The vLLM rows as frontier points: decode cost against vLLM's own full model, greedy agreement from their
    own replies, teacher-forced quality from the same weights in our loop."""
    ours = {p["name"]: p for p in points}
    full_ms = next((r["decode_ms_per_token"]["median"] for n, r in vllm["rows"].items() if n == "vllm full"), None)
    out = []
    for name, row in vllm["rows"].items():
        like, spec = ours[row["like"]], row.get("speculation") or {}
        ms = row["decode_ms_per_token"]["median"]
        out.append({"name": name, "kind": row["kind"], "mode": "vllm", "decode_step": row["decode_step"],
                    "decode_ms_per_token": ms, "decode_ms_spread": row["decode_ms_per_token"],
                    "top1": like["top1"], "nll": like["nll"],
                    "first_divergence_mean": row["agreement"]["first_divergence_mean"],
                    "token_match": row["agreement"]["token_match"], "exact_match": row["agreement"]["exact_match"],
                    "accuracy": (row.get("answers") or {}).get("accuracy"),
                    "acceptance_rate": spec.get("acceptance_rate"), "tokens_per_full_pass": spec.get("tokens_per_full_pass"),
                    "decode_ms_vs_full": ms / full_ms if full_ms else None, "decode_ms_vs_pruned": None,
                    "engine_start_s": row["engine_start_s"]})
    return out


def load_models(config: FrontierConfig, entries: list[ModelEntry], console) -> dict[str, OverFillModel]:
    """Entry name -> its model: each source loaded once, and one copy of a full model that several share."""
    by_source: dict = {}
    fulls: dict[str, torch.nn.Module] = {}
    for entry in entries:
        source = config.source_of(entry)
        if source in by_source:
            continue
        console.print(f"loading [bold]{escape(source.describe())}[/]"
                      + (f" (decoder in {source.decoder_dtype})" if source.decoder_dtype else ""))
        model = source.load(full_alone=True)
        full = fulls.setdefault(model.full_fingerprint, model.full)
        if full is not model.full:  # the same weights: keep one copy in memory
            model = OverFillModel(full, model.decoder, model.tokenizer, full_source=model.full_source)
        model.full.eval()
        model.decoder.eval()
        by_source[source] = model
    return {entry.name: by_source[config.source_of(entry)] for entry in entries}


def kind_of(entry: ModelEntry) -> str:
    """What dial a configuration turns, for the figure's colours and the table."""
    if entry.draft_tokens:
        return "speculative"
    if entry.refresh_every:
        return "refresh"
    if entry.decoder_dtype:
        return "dtype"
    return entry.mode


def frontier_points(entries: list[ModelEntry], quality: dict, timing: dict) -> list[dict]:
    """One point per configuration: its decode cost (and paired ratios to the full and pruned rows) and quality."""
    rows = timing["rows"]
    full = next((e.name for e in entries if e.mode == "full" and e.name in rows), None)
    pruned = next((e.name for e in entries if e.mode == "pruned" and e.name in rows), None)
    models = quality["models"]
    full_quality = next((models[e.name] for e in entries if e.mode == "full" and e.name in models), {})
    points = []
    for entry in entries:
        # a speculative configuration's replies are the full model's: its quality is the full model's
        row, m = rows[entry.name], models.get(entry.name) or (full_quality if entry.draft_tokens else {})
        agreement = m.get("agreement", {})
        spec = row.get("speculation") or m.get("speculation")
        point = {"name": entry.name, "configuration": entry.configuration.name, "kind": kind_of(entry),
                 "mode": entry.generation_mode,
                 "decode_step": row["decode_step"], "decode_ms_per_token": row["decode_ms_per_token"]["median"],
                 "decode_ms_spread": row["decode_ms_per_token"],
                 "top1": agreement.get("top1"), "first_divergence_mean": agreement.get("first_divergence_mean"),
                 "token_match": agreement.get("token_match"), "exact_match": agreement.get("exact_match"),
                 "nll": m.get("nll"), "accuracy": (m.get("answers") or {}).get("accuracy"),
                 "acceptance_rate": spec.get("acceptance_rate") if spec else None,
                 "tokens_per_full_pass": spec.get("tokens_per_full_pass") if spec else None,
                 "replies_equal_full": row.get("replies_equal_full")}
        for name, other in (("vs_full", full), ("vs_pruned", pruned)):
            ratio = paired_ratio(row, rows[other], "decode_ms_per_token") if other else None
            point[f"decode_ms_{name}"] = ratio["median"] if ratio else None
        points.append(point)
    return points


def pareto(points: list[dict], quality: str = "top1") -> list[str]:
    """Names of the configurations no other beats on both axes (cheaper and at least as good), cheapest first."""
    ranked = sorted((p for p in points if p[quality] is not None), key=lambda p: (p["decode_ms_per_token"], -p[quality]))
    front, best = [], -float("inf")
    for p in ranked:
        if p[quality] > best:
            front.append(p["name"])
            best = p[quality]
    return front

"""`overfill eval`: held-out evaluation of OverFill models against the full model (docs/design.md, "Measuring it honestly").

For each named entry (a checkpoint evaluated in a mode: overfill / full / pruned) on a held-out file:

- teacher-forced reply NLL and perplexity. Token 1 is reported apart: in OverFill it comes from
  the full model's prefill logits, so the headline number is over tokens 2..N (what the decoder
  does). Scoring follows the two-stage picture of the paper's Figure 1 (scoring.py);
- the probability of the correct token averaged by absolute reply position (paper Figure 8),
  JSON + PNG: the cleanest view of what the decoder learned;
- agreement with the full model's own greedy replies (agreement.py): every entry teacher-forced on
  them (top-1 agreement and NLL, token 1 apart, and by reply position, JSON + PNG), and each
  entry's greedy replies against them (token match over tokens 2..N, exact match, tokens before
  the first divergence);
- exact-match accuracy when references carry a final answer (GSM8K's `#### number`), with the
  share of correct answers already settled by the first (full-model) token (answers.py).

Teacher forcing always runs on our PyTorch code. The greedy replies come from our own loop
(`--engine torch`) or from vLLM (`--engine vllm`, vllm_replies.py: the same prompt ids, greedy,
the same stop tokens), and every metric on them is computed here, the same way for both.

This module runs the command; scoring.py computes token scores and replies, metrics.py and
agreement.py turn them into these numbers, plots.py draws the figures and report.py prints the table.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict

import torch
from rich.markup import escape

from overfill.atomic import atomic_write_text, check_writable
from overfill.data.examples import check_examples_fit
from overfill.devices import decide_compile
from overfill.evaluation.agreement import DEFAULT_TIE, first_divergence, greedy_agreement, reference_examples, score_agreement
from overfill.evaluation.answers import answer_accuracy, extract_answer, reference_answer
from overfill.evaluation.config import EvalConfig, ModelEntry
from overfill.evaluation.metrics import nll_summary, per_position
from overfill.evaluation.plots import AGREEMENT_PANELS, plot_per_position
from overfill.evaluation.report import print_eval_table
from overfill.evaluation.scoring import generate_ids_batched, score_examples
from overfill.evaluation.vllm_replies import vllm_replies
from overfill.generation import context_limit, eos_ids_of
from overfill.model_source import ModelSource
from overfill.speculative import Speculation

Replies = tuple[list[list[int]], dict]  # reply token ids per example (stop token included), seconds by phase

# ---------------------------------------------------------------- the command


def evaluate(config: EvalConfig, console=None) -> dict:
    """Evaluate every entry; write results.json, per_position.{json,png}, agreement_per_position.{json,png}
    and replies.jsonl to `config.out`.

    `console` (a rich Console) gets progress lines and the summary table; None keeps it silent.
    """
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    config.check_files()  # the held-out file, before any model loads
    # Checked now, created only when there are results: a run that fails leaves no empty folder behind.
    out = check_writable(config.out, "--out")
    engine_version = _engine_version(config) if config.generate else None
    entries = config.model_entries()
    compile = None
    groups: dict[ModelSource, list[ModelEntry]] = {}
    for entry in entries:
        groups.setdefault(config.source_of(entry), []).append(entry)

    examples = data_summary = references = None
    reference_replies: dict[str, Replies] = {}  # full-model fingerprint -> the full model's greedy replies
    models: dict[str, dict] = {}
    positions: dict[str, dict] = {}
    agreement_positions: dict[str, dict] = {}  # entry -> per-position agreement on the full model's replies
    reply_rows: list[dict] = []
    for source, group in groups.items():
        what = source.describe()
        say(f"loading [bold]{what}[/]")
        model = source.load(full_alone=True)
        tokenizer = model.tokenizer
        if examples is None:
            loaded = config.held_out(tokenizer)
            examples, data_summary = loaded.examples, loaded.as_dict()
            texts = [tokenizer.decode(e.target_ids, skip_special_tokens=True) for e in examples]
            references = [reference_answer(t) for t in texts]
            kind = config.answer
            if kind == "auto":
                kind = "gsm8k" if all(r is not None for r in references) else "none"
            if kind == "none":
                references = [None] * len(examples)
            data_summary.update(target_tokens=sum(len(e.target_ids) for e in examples), answer=kind,
                                prompts_alone=not any(e.target_ids for e in examples))
            say(f"{loaded.summary()}; " + ("prompts alone: agreement with the full model only" if data_summary["prompts_alone"]
                                           else f"{data_summary['target_tokens']} reply tokens"))
        # Per model: entries may come from checkpoints of models with other context sizes.
        check_examples_fit(examples, context_limit(model), path=config.data,
                           new_tokens=config.max_new_tokens if config.generate else None)
        contexts = [e.context_ids for e in examples]  # exactly what either engine gets as the prompt
        fingerprint = model.full_fingerprint
        eos = eos_ids_of(tokenizer, model.full, model.decoder)  # what ends a reply, in both engines

        scored: dict[tuple, object] = {}  # (what, scoring mode, refresh) -> scores, within this group's model
        for entry in group:
            models[entry.name] = {"configuration": entry.configuration.name, "mode": entry.generation_mode, "source": what,
                                  "seconds": {}, "stop_ids": sorted(eos),
                                  **({"refresh_every": entry.refresh_every} if entry.refresh_every else {}),
                                  **({"draft_tokens": entry.draft_tokens, "drafter": entry.drafter}
                                     if entry.draft_tokens else {}),
                                  **({"decoder_dtype": entry.decoder_dtype} if entry.decoder_dtype else {})}
            if config.nll:
                t0 = time.perf_counter()
                # speculative entries score as the full model does (their replies are its own): scored once per group
                key = ("reference", entry.scoring_mode, entry.refresh_every)
                if key not in scored:
                    scored[key] = score_examples(model, entry.scoring_mode, examples, batch_size=config.batch_size,
                                                 refresh_every=entry.refresh_every)
                scores = scored[key]
                models[entry.name].update(nll_summary(scores))
                models[entry.name]["seconds"]["teacher_forced"] = round(time.perf_counter() - t0, 2)
                positions[entry.name] = per_position(scores)
                say(f"  {entry.name}: reply NLL (tokens 2..N) {models[entry.name]['nll']:.3f} "
                    f"in {models[entry.name]['seconds']['teacher_forced']:.0f} s")
        if config.generate and config.engine == "vllm":
            model = None  # vLLM loads its own copy of the weights: ours are freed first
            gc.collect()
        if not config.generate:
            del model
            gc.collect()
            continue

        if config.engine == "torch" and compile is None:  # decided once, for every entry's replies
            generating = sum(e.mode != "full" for e in entries) + len({config.source_of(e) for e in entries})
            compile, why = decide_compile(config.compile, torch.device(config.device),
                                          generating * len(contexts) * config.max_new_tokens)
            say(f"[dim]{escape(why)}[/]")

        def greedy(mode: str, name: str, model=model, source=source, entry: ModelEntry | None = None) -> Replies:
            return greedy_replies(config, mode, contexts, eos, model=model, source=source, what=f"{name} ({mode} of {what})",
                                  entry=entry, compile=compile)

        if fingerprint not in reference_replies:
            say(f"greedy replies of the full model (the agreement reference) on {config.engine}")
            reference_replies[fingerprint] = greedy("full", "the full model")
            say(f"  done in {sum(reference_replies[fingerprint][1].values()):.0f} s")
        reference = reference_replies[fingerprint][0]
        for entry in group:
            replies, seconds = (reference_replies[fingerprint] if entry.mode == "full"
                                else greedy(entry.generation_mode, entry.name, entry=entry))
            result = models[entry.name]
            if "speculation" in seconds:  # the drafting counters travel with the timings
                result["speculation"] = seconds.pop("speculation")
            result["seconds"].update(seconds)
            result.update(engine=config.engine, engine_version=engine_version, agreement=greedy_agreement(replies, reference))
            reply_texts = [tokenizer.decode([t for t in r if t not in eos], skip_special_tokens=True) for r in replies]
            first_texts = [tokenizer.decode(r[:1], skip_special_tokens=True) for r in replies]
            result["mean_reply_tokens"] = sum(len(r) for r in replies) / len(replies)
            if any(r is not None for r in references):
                result["answers"] = answer_accuracy(reply_texts, first_texts, references)
            for i, (text, ids) in enumerate(zip(reply_texts, replies)):
                reply_rows.append({"model": entry.name, "engine": config.engine, "index": i, "reply": text,
                                   "answer": extract_answer(text), "reference_answer": references[i], "token_ids": ids,
                                   "first_divergence": first_divergence(ids, reference[i])})
            accepted = result.get("speculation", {}).get("acceptance_rate")
            say(f"  {entry.name}: greedy replies on {config.engine} in {sum(seconds.values()):.0f} s, "
                f"token agreement with the full model (tokens 2..N) {result['agreement']['token_match']:.0%}"
                + (f", {accepted:.0%} of drafts accepted" if accepted is not None else ""))
        if config.agreement:
            if model is None:  # vLLM had the machine: our weights come back for teacher forcing
                model = source.load(full_alone=True)
            on_reference = reference_examples(contexts, reference)
            tie = config.agreement_tie if config.agreement_tie is not None else DEFAULT_TIE[config.dtype]
            for entry in group:
                t0 = time.perf_counter()
                key = ("agreement", entry.scoring_mode, entry.refresh_every)
                if key not in scored:
                    scored[key] = score_agreement(model, entry.scoring_mode, on_reference, tie=tie,
                                                  batch_size=config.batch_size, refresh_every=entry.refresh_every)
                summary, agreement_positions[entry.name] = scored[key]
                models[entry.name]["agreement"].update(summary)
                models[entry.name]["seconds"]["agreement"] = round(time.perf_counter() - t0, 2)
                say(f"  {entry.name}: teacher-forced on the full model's replies, top-1 agreement (tokens 2..N) "
                    f"{summary['top1']:.1%}, NLL {summary['nll']:.3f}")
        del model, greedy
        gc.collect()

    results = {
        "config": asdict(config),
        "data": data_summary,
        "models": models,
        "refresh": refresh_summary(entries, models),
        "per_position": positions,
        "agreement_per_position": agreement_positions,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    if positions:
        atomic_write_text(out / "per_position.json", json.dumps(positions, indent=1) + "\n")
        plot_per_position(positions, out / "per_position.png", modes={n: m["mode"] for n, m in models.items()})
    if agreement_positions:
        atomic_write_text(out / "agreement_per_position.json", json.dumps(agreement_positions, indent=1) + "\n")
        plot_per_position(agreement_positions, out / "agreement_per_position.png", panels=AGREEMENT_PANELS,
                          modes={n: m["mode"] for n, m in models.items()},
                          title="Agreement with the full model's greedy replies, by reply position (teacher forced)")
    if reply_rows:
        atomic_write_text(out / "replies.jsonl", "".join(json.dumps(r) + "\n" for r in reply_rows))
    if console is not None:
        print_eval_table(console, results)
        console.print(f"results in [bold]{out}[/] ({results['seconds']:.0f} s)")
    return results


def refresh_summary(entries: list[ModelEntry], models: dict[str, dict]) -> list[dict]:
    """Per refresh entry: how much of its plain OverFill entry's NLL gap to the full model it closes. Its plain entry is
    the one of the same checkpoint and decoder dtype without refresh, found by what it is, not by its name (an entry
    with its own dials has none when no such entry was asked for)."""
    full = next((models[e.name].get("nll") for e in entries if e.mode == "full"), None)
    out = []
    for entry in entries:
        if not entry.refresh_every:
            continue
        plain_entry = next((e for e in entries if e.mode == entry.mode and e.checkpoint == entry.checkpoint
                            and e.decoder_dtype == entry.decoder_dtype and not e.refresh_every and not e.draft_tokens), None)
        if plain_entry is None:
            continue
        plain = models[plain_entry.name].get("nll")
        nll = models[entry.name].get("nll")
        if plain is None or nll is None:
            continue
        gap = plain - full if full is not None else None
        out.append({"name": entry.name, "refresh_every": entry.refresh_every, "nll": nll, "plain_nll": plain,
                    "full_nll": full, "gap_closed": (plain - nll) / gap if gap else None})
    return out


def greedy_replies(config: EvalConfig, mode: str, contexts: list[list[int]], eos: set[int], *, model, source: ModelSource,
                   what: str = "", entry: ModelEntry | None = None, compile: bool | None = None) -> Replies:
    """Greedy replies to `contexts` in `mode` from the configured engine: our loop on the loaded `model`
    (torch), or vLLM on `source`'s folder in a process of its own (vllm). `entry` adds its refresh or
    speculative settings; a speculative entry's counters come back as seconds["speculation"]."""
    if config.engine == "vllm":
        return vllm_replies(source, mode, contexts, max_new_tokens=config.max_new_tokens, stop_ids=eos, what=what)
    t0 = time.perf_counter()
    speculation = Speculation() if mode == "speculative" else None
    replies = generate_ids_batched(model, mode, contexts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                   refresh_every=entry.refresh_every if entry else 0,
                                   draft_tokens=entry.draft_tokens if entry and entry.draft_tokens else 4,
                                   drafter=entry.drafter if entry else "overfill", speculation=speculation,
                                   compile=True if entry and entry.compiled else compile)
    seconds = {"generate": round(time.perf_counter() - t0, 2)}
    return replies, {**seconds, "speculation": speculation.as_dict()} if speculation else seconds


def _engine_version(config: EvalConfig) -> str:
    """The generating engine's version, recorded beside its replies; for vLLM checked before any work."""
    if config.engine == "vllm":
        from overfill.vllm.runtime import vllm_version

        return vllm_version()  # one error line when vLLM is missing
    import torch

    return f"torch {torch.__version__}"

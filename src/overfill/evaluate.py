"""Held-out evaluation of OverFill models against the full model (issue 4 part 3; DESIGN §1 "Measuring it honestly").

For each named entry (a checkpoint evaluated in a mode: overfill / full / pruned) on a held-out file:

- teacher-forced reply NLL and perplexity. Token 1 is reported apart: in OverFill it comes from
  the full model's prefill logits, so the headline number is over tokens 2..N (what the decoder
  does). Scoring follows the two-stage picture of the paper's Figure 1 (scoring.py);
- the probability of the correct token averaged by absolute reply position (paper Figure 8),
  JSON + PNG: the cleanest view of what the decoder learned;
- greedy-generation agreement with the full model (token match over tokens 2..N, exact match);
- exact-match accuracy when references carry a final answer (GSM8K's `#### number`), with the
  share of correct answers already settled by the first (full-model) token (answers.py).

This module turns scores and replies into those numbers and runs the command; the figure is
drawn by plots.py and the table by report.py.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from overfill.answers import answer_accuracy, extract_answer, reference_answer
from overfill.atomic import atomic_write_text
from overfill.data import load_examples
from overfill.errors import OverfillError
from overfill.generation import MODES, eos_ids_of
from overfill.plots import plot_per_position
from overfill.report import print_eval_table
from overfill.scoring import TokenScores, generate_ids_batched, score_examples

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ANSWER_KINDS = ("auto", "gsm8k", "none")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ModelEntry:
    name: str  # column name in reports
    mode: str  # overfill | full | pruned
    checkpoint: str | None  # OverFill checkpoint folder; None = the config's shared source


def parse_entry(spec: str) -> ModelEntry:
    """'[NAME=]MODE[:CHECKPOINT]', e.g. 'overfill', 'base=pruned:runs/pruned-ft', 'full:runs/ckpt'."""
    text = spec.strip()
    eq, colon = text.find("="), text.find(":")
    name = ""
    if eq != -1 and (colon == -1 or eq < colon):
        name, text = text[:eq].strip(), text[eq + 1 :]
    mode, _, checkpoint = text.partition(":")
    mode = mode.strip()
    if mode not in MODES:
        raise OverfillError(f"model entry '{spec}' has unknown mode '{mode}': write [NAME=]MODE[:CHECKPOINT] with MODE one of {', '.join(MODES)}")
    return ModelEntry(name or mode, mode, checkpoint.strip() or None)


@dataclass
class EvalConfig:
    data: str
    """Held-out JSONL/JSON file (chat messages, ShareGPT, Alpaca, or prompt/response fields)."""
    entries: tuple[str, ...] = ("full", "pruned", "overfill")
    """Models to evaluate (repeat or comma-separate), each [NAME=]MODE[:CHECKPOINT]; MODE is overfill, full or pruned; without CHECKPOINT the shared --checkpoint (or --model/--decoder) is used."""
    checkpoint: str | None = None
    """OverFill checkpoint folder shared by entries that name none."""
    model: str | None = None
    """Full model (zoo name, folder or hub id) when there is no checkpoint, or to override the one a checkpoint records."""
    decoder: str | None = None
    """Pruned decoder folder paired with --model (e.g. from `overfill prune`)."""
    out: str = "runs/eval"
    """Output folder: results.json, per_position.json, per_position.png, replies.jsonl."""
    prompt_field: str | None = None
    """Record field holding the prompt (e.g. GSM8K's 'question'); use with --response-field."""
    response_field: str | None = None
    """Record field holding the reference reply (e.g. GSM8K's 'answer')."""
    limit: int | None = None
    """Evaluate only the first N usable examples."""
    max_context: int | None = 1024
    """Keep at most this many context tokens (the end of the context is kept)."""
    max_target: int | None = 512
    """Keep at most this many reply tokens (the start of the reply is kept)."""
    batch_size: int = 8
    """Examples per forward pass (teacher forcing and generation)."""
    generate: bool = True
    """Also generate greedy replies: agreement with the full model and answer accuracy."""
    max_new_tokens: int = 256
    """Reply length limit for greedy generation."""
    answer: str = "auto"
    """Final-answer accuracy: gsm8k ('#### number' in references), none, or auto (gsm8k when every reference has '####')."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow custom model code (only for models you trust)."""

    def __post_init__(self):
        if not self.data:
            raise OverfillError("no held-out data given: pass a JSONL file (e.g. --data ../shared/data/gsm8k/test.jsonl)")
        if not Path(self.data).is_file():
            raise OverfillError(f"held-out data file {self.data} does not exist: pass a JSONL or JSON file")
        specs = [self.entries] if isinstance(self.entries, str) else list(self.entries)
        self.entries = tuple(s.strip() for spec in specs for s in spec.split(",") if s.strip())  # 'full,overfill' works too
        if not self.entries:
            raise OverfillError("no models to evaluate: pass at least one entry, e.g. overfill, full, pruned")
        parsed = self.model_entries()
        names = [e.name for e in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise OverfillError(f"model entry name '{duplicates[0]}' is used twice: name entries NAME=MODE[:CHECKPOINT]")
        for e in parsed:
            if e.checkpoint is None and self.checkpoint is None and self.model is None:
                raise OverfillError(f"model entry '{e.name}' names no checkpoint: add :CHECKPOINT, or pass --checkpoint or --model/--decoder")
            if e.checkpoint is None and self.checkpoint is None and self.decoder is None and e.mode != "full":
                raise OverfillError(f"model entry '{e.name}' (mode {e.mode}) needs a decoder: pass --decoder or an OverFill checkpoint")
        if (self.prompt_field is None) != (self.response_field is None):
            raise OverfillError("--prompt-field and --response-field go together (e.g. question and answer for GSM8K)")
        if self.limit is not None and self.limit < 1:
            raise OverfillError(f"limit must be at least 1, got {self.limit}")
        if self.max_context is not None and self.max_context < 1:
            raise OverfillError(f"max_context must be at least 1 (or unset), got {self.max_context}")
        if self.max_target is not None and self.max_target < 2:
            raise OverfillError(f"max_target must be at least 2 (token 1 is the full model's), got {self.max_target}")
        if self.batch_size < 1:
            raise OverfillError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise OverfillError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.answer not in ANSWER_KINDS:
            raise OverfillError(f"unknown answer kind '{self.answer}': pick one of {', '.join(ANSWER_KINDS)}")
        if self.dtype not in DTYPES:
            raise OverfillError(f"unknown dtype '{self.dtype}': pick one of {', '.join(DTYPES)}")

    def model_entries(self) -> list[ModelEntry]:
        return [parse_entry(s) for s in self.entries]


# ---------------------------------------------------------------- teacher-forced metrics


def nll_summary(scores: list[TokenScores]) -> dict:
    """Token 1 apart, tokens 2..N as the headline (token-weighted means over all replies)."""
    first = [s.logprobs[0] for s in scores]
    rest = [lp for s in scores for lp in s.logprobs[1:]]
    rest_hits = [h for s in scores for h in s.top1[1:]]
    total = -(sum(first) + sum(rest))
    nll = -sum(rest) / len(rest) if rest else float("nan")
    nll_all = total / (len(first) + len(rest))
    return {
        "nll_token1": -sum(first) / len(first),
        "nll": nll,  # tokens 2..N: the decoder's part in OverFill
        "ppl": math.exp(nll) if rest else float("nan"),
        "nll_all": nll_all,
        "ppl_all": math.exp(nll_all),
        "top1_token1": sum(s.top1[0] for s in scores) / len(scores),
        "top1": sum(rest_hits) / len(rest_hits) if rest_hits else float("nan"),
        "token1_share_of_nll": -sum(first) / total if total > 0 else float("nan"),
        "replies": len(scores),
        "tokens": len(rest),
    }


def per_position(scores: list[TokenScores]) -> dict:
    """Mean probability of the correct token, its mean NLL and the top-1 rate at each absolute reply position (1-based lists)."""
    width = max(len(s.logprobs) for s in scores)
    prob, nll, hit, count = [0.0] * width, [0.0] * width, [0] * width, [0] * width
    for s in scores:
        for i, (lp, h) in enumerate(zip(s.logprobs, s.top1)):
            prob[i] += math.exp(lp)
            nll[i] -= lp
            hit[i] += int(h)
            count[i] += 1
    return {
        "position": list(range(1, width + 1)),
        "mean_prob": [p / c for p, c in zip(prob, count)],
        "mean_nll": [x / c for x, c in zip(nll, count)],
        "top1": [h / c for h, c in zip(hit, count)],
        "count": count,
    }


# ---------------------------------------------------------------- agreement with the full model


def agreement(replies: list[list[int]], reference: list[list[int]]) -> dict:
    """Position-wise token match with the full model's greedy replies (over the longer reply), and exact match.

    Token 1 is reported apart: in OverFill both replies take it from the same full-model logits.
    """
    first = [bool(a[:1] == b[:1]) for a, b in zip(replies, reference)]
    matched = compared = 0
    prefix = []
    for a, b in zip(replies, reference):
        longer = max(len(a), len(b))
        matched += sum(1 for i in range(1, min(len(a), len(b))) if a[i] == b[i])
        compared += max(longer - 1, 0)
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        prefix.append(same)
    return {
        "token1_match": sum(first) / len(first),
        "token_match": matched / compared if compared else float("nan"),  # tokens 2..N
        "exact_match": sum(a == b for a, b in zip(replies, reference)) / len(replies),
        "mean_common_prefix": sum(prefix) / len(prefix),
    }


# ---------------------------------------------------------------- data and models


def load_eval_examples(config: EvalConfig, tokenizer):
    """data.LoadedData of the held-out file: (context ids, target ids) pairs, truncated, first `limit` kept."""
    return load_examples(config.data, tokenizer, prompt_field=config.prompt_field, response_field=config.response_field,
                         max_context=config.max_context, max_target=config.max_target, limit=config.limit)


def load_for_eval(checkpoint: str | None, model: str | None, decoder: str | None, *, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False):
    """An OverFillModel from a checkpoint or a model/decoder pair; a model alone stands in for both halves (full mode only)."""
    from overfill.modeling import OverFillModel, load_overfill

    if checkpoint or decoder:
        return load_overfill(checkpoint, model=model, decoder=decoder, dtype=dtype, trust_remote_code=trust_remote_code)
    from overfill.zoo import load_model

    full, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, quiet=True)
    return OverFillModel(full, full, tokenizer, full_source=model)


def _source_of(entry: ModelEntry, config: EvalConfig) -> tuple:
    if entry.checkpoint:
        return (entry.checkpoint, config.model, None)
    return (config.checkpoint, config.model, config.decoder)


# ---------------------------------------------------------------- the command


def evaluate(config: EvalConfig, console=None) -> dict:
    """Evaluate every entry; write results.json, per_position.{json,png} and replies.jsonl to `config.out`.

    `console` (a rich Console) gets progress lines and the summary table; None keeps it silent.
    """
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = config.model_entries()
    groups: dict[tuple, list[ModelEntry]] = {}
    for entry in entries:
        groups.setdefault(_source_of(entry, config), []).append(entry)

    examples = data_summary = references = None
    reference_replies: dict[str, tuple[list[list[int]], float]] = {}  # full-model fingerprint -> (greedy replies, seconds)
    models: dict[str, dict] = {}
    positions: dict[str, dict] = {}
    reply_rows: list[dict] = []
    for (checkpoint, full_name, decoder), group in groups.items():
        what = checkpoint or f"{full_name}" + (f" + {decoder}" if decoder else "")
        say(f"loading [bold]{what}[/]")
        model = load_for_eval(checkpoint, full_name, decoder, dtype=DTYPES[config.dtype], trust_remote_code=config.trust_remote_code)
        tokenizer = model.tokenizer
        if examples is None:
            loaded = load_eval_examples(config, tokenizer)
            examples, data_summary = loaded.examples, loaded.as_dict()
            texts = [tokenizer.decode(e.target_ids, skip_special_tokens=True) for e in examples]
            references = [reference_answer(t) for t in texts]
            kind = config.answer
            if kind == "auto":
                kind = "gsm8k" if all(r is not None for r in references) else "none"
            if kind == "none":
                references = [None] * len(examples)
            data_summary.update(target_tokens=sum(len(e.target_ids) for e in examples), answer=kind)
            say(f"{loaded.summary()}; {data_summary['target_tokens']} reply tokens")
        contexts = [e.context_ids for e in examples]
        fingerprint = model.full_fingerprint

        def greedy(mode: str) -> tuple[list[list[int]], float]:
            t0 = time.perf_counter()
            return generate_ids_batched(model, mode, contexts, max_new_tokens=config.max_new_tokens,
                                        batch_size=config.batch_size), time.perf_counter() - t0

        if config.generate and fingerprint not in reference_replies:
            say("greedy replies of the full model (the agreement reference)")
            reference_replies[fingerprint] = greedy("full")
            say(f"  done in {reference_replies[fingerprint][1]:.0f} s")
        for entry in group:
            t0 = time.perf_counter()
            scores = score_examples(model, entry.mode, examples, batch_size=config.batch_size)
            tf_seconds = time.perf_counter() - t0
            result = {"mode": entry.mode, "source": what, **nll_summary(scores), "seconds": {"teacher_forced": round(tf_seconds, 2)}}
            positions[entry.name] = per_position(scores)
            if config.generate:
                reference = reference_replies[fingerprint][0]
                replies, gen_seconds = reference_replies[fingerprint] if entry.mode == "full" else greedy(entry.mode)
                result["seconds"]["generate"] = round(gen_seconds, 2)
                result["agreement"] = agreement(replies, reference)
                eos = eos_ids_of(tokenizer, model.full, model.decoder)
                reply_texts = [tokenizer.decode([t for t in r if t not in eos], skip_special_tokens=True) for r in replies]
                first_texts = [tokenizer.decode(r[:1], skip_special_tokens=True) for r in replies]
                result["mean_reply_tokens"] = sum(len(r) for r in replies) / len(replies)
                if any(r is not None for r in references):
                    result["answers"] = answer_accuracy(reply_texts, first_texts, references)
                for i, text in enumerate(reply_texts):
                    reply_rows.append({"model": entry.name, "index": i, "reply": text,
                                       "answer": extract_answer(text), "reference_answer": references[i]})
            models[entry.name] = result
            say(f"  {entry.name}: reply NLL (tokens 2..N) {result['nll']:.3f} in {sum(result['seconds'].values()):.0f} s")
        del model
        gc.collect()

    results = {
        "config": asdict(config),
        "data": data_summary,
        "models": models,
        "per_position": positions,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "per_position.json", json.dumps(positions, indent=1) + "\n")
    plot_per_position(positions, out / "per_position.png", modes={n: m["mode"] for n, m in models.items()})
    if reply_rows:
        atomic_write_text(out / "replies.jsonl", "".join(json.dumps(r) + "\n" for r in reply_rows))
    if console is not None:
        print_eval_table(console, results)
        console.print(f"results in [bold]{out}[/] ({results['seconds']:.0f} s)")
    return results

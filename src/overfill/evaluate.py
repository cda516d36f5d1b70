"""Held-out evaluation of OverFill models against the full model (issue 4 part 3; DESIGN §1 "Measuring it honestly").

For each named entry (a checkpoint evaluated in a mode: overfill / full / pruned) on a held-out file:

- teacher-forced reply NLL and perplexity. Token 1 is reported apart: in OverFill it comes from
  the full model's prefill logits, so the headline number is over tokens 2..N (what the decoder
  does). Scoring follows the two-stage picture of the paper's Figure 1: the *prefill model* reads
  the context and scores y1 from its last logits; the *decode model* reads y1..y_{N-1} on that
  cache and scores y2..yN (`reply_logprobs`, the training loss of modeling.forward with
  per-token log-probs kept);
- the probability of the correct token averaged by absolute reply position (paper Figure 8),
  JSON + PNG: the cleanest view of what the decoder learned;
- greedy-generation agreement with the full model (token match over tokens 2..N, exact match);
- exact-match accuracy when references carry a final answer (GSM8K's `#### number`), with the
  share of correct answers already settled by the first (full-model) token.

`reply_logprobs` / `score_examples` / `generate_ids_batched` also serve the lm-eval adapter.
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from overfill.errors import OverfillError
from overfill.generation import MODES, GenerationConfig, eos_ids_of, generate_ids, models_for, pad_id_of, prefill

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


# ---------------------------------------------------------------- answers (GSM8K-style)

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; '18.00' -> '18'; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def reference_answer(reference: str) -> str | None:
    """GSM8K: the number after '####' in the reference solution; None when there is none."""
    if "####" not in reference:
        return None
    found = _NUMBER.search(reference.rsplit("####", 1)[1])
    return normalise_number(found.group()) if found else None


def extract_answer(reply: str) -> str | None:
    """The number after the last '####' if the reply has one, else the last number in the reply."""
    tail = reply.rsplit("####", 1)[1] if "####" in reply else reply
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    return normalise_number(numbers[0] if "####" in reply else numbers[-1])


# ---------------------------------------------------------------- teacher-forced scoring


@dataclass
class TokenScores:
    """One reply under teacher forcing: log p(y_i | x, y_<i) and whether y_i was the argmax, i = 1..N."""

    logprobs: list[float]
    top1: list[bool]


@torch.inference_mode()
def reply_logprobs(model, mode: str, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                   target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, N] and argmax hits [B, N] of right-padded targets after left-padded contexts.

    The prefill model reads the context and scores y1 from its last logits; the decode model reads
    y1..y_{N-1} on that cache and scores y2..yN (overfill: full then decoder; full / pruned: one model).
    Padded target positions hold 0 / False.
    """
    prefill_model, decode_model = models_for(mode, model)
    first_logits, cache = prefill(prefill_model, context_ids, context_mask)  # [B, V], cache of x
    step_logits = [first_logits[:, None]]  # y1
    n = target_ids.shape[1]
    if n > 1:
        # The handoff: the decode model continues the prefill model's cache; positions continue
        # from each row's own context length, whatever its padding.
        mask = torch.cat([context_mask, target_mask[:, :-1]], dim=1)  # [B, Tc + N - 1]
        positions = context_mask.sum(-1, keepdim=True) + torch.arange(n - 1)  # [B, N-1]
        out = decode_model(input_ids=target_ids[:, :-1], attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True)
        step_logits.append(out.logits)  # [B, N-1, V] predictions of y2..yN
    logprobs = torch.zeros(target_ids.shape, dtype=torch.float32)
    hits = torch.zeros(target_ids.shape, dtype=torch.bool)
    for row in range(target_ids.shape[0]):  # one row at a time keeps float32 copies of [N, V] small
        logits = torch.cat([part[row].float() for part in step_logits], dim=0)  # [N, V]
        logprobs[row] = logits.log_softmax(-1).gather(-1, target_ids[row, :, None]).squeeze(-1)
        hits[row] = logits.argmax(-1) == target_ids[row]
    real = target_mask.bool()
    return logprobs.masked_fill(~real, 0.0), hits & real


def score_examples(model, mode: str, examples, *, batch_size: int = 8, pad_id: int | None = None) -> list[TokenScores]:
    """Teacher-forced TokenScores for each Example (context_ids, target_ids), in input order.

    Batches are formed from length-sorted examples so little compute goes to padding.
    """
    from overfill.data import collate

    pad_id = pad_id_of(model.tokenizer) if pad_id is None else pad_id
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].context_ids) + len(examples[i].target_ids)))
    scores: list[TokenScores | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id)
        logprobs, hits = reply_logprobs(model, mode, batch.context_ids, batch.context_mask, batch.target_ids, batch.target_mask)
        for k, i in enumerate(rows):
            n = len(examples[i].target_ids)
            scores[i] = TokenScores(logprobs[k, :n].tolist(), hits[k, :n].tolist())
    return scores


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
    """Mean probability of the correct token and top-1 rate at each absolute reply position (1-based lists)."""
    width = max(len(s.logprobs) for s in scores)
    prob, hit, count = [0.0] * width, [0] * width, [0] * width
    for s in scores:
        for i, (lp, h) in enumerate(zip(s.logprobs, s.top1)):
            prob[i] += math.exp(lp)
            hit[i] += int(h)
            count[i] += 1
    return {
        "position": list(range(1, width + 1)),
        "mean_prob": [p / c for p, c in zip(prob, count)],
        "top1": [h / c for h, c in zip(hit, count)],
        "count": count,
    }


# ---------------------------------------------------------------- generation and agreement


def generate_ids_batched(model, mode: str, contexts: list[list[int]], *, max_new_tokens: int, batch_size: int = 8,
                         stop: tuple[str, ...] = (), temperature: float = 0.0, seed: int | None = None) -> list[list[int]]:
    """Reply token ids (end-of-turn token included when produced) for pre-tokenised contexts, in input order.

    Same loop as `generation.generate`, but from token ids, so the context is exactly the one
    scored under teacher forcing (or the one lm-eval built).
    """
    from overfill.prune import left_pad

    tokenizer = model.tokenizer
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids_of(tokenizer, model.full, model.decoder)
    config = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop)

    def is_stopped(_row, row_ids):
        tail = tokenizer.decode(row_ids[-16:].tolist(), skip_special_tokens=True)
        return any(s in tail for s in stop)

    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    replies: list[list[int]] = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([contexts[i] for i in rows], pad_id)
        done = [False] * len(rows)
        for step in generate_ids(model, ids, mask, config, eos_ids=eos, pad_id=pad_id, is_stopped=is_stopped if stop else None):
            for k, i in enumerate(rows):
                if not done[k]:
                    replies[i].append(int(step.tokens[k]))
                    done[k] = bool(step.finished[k])
    return replies


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


def answer_accuracy(texts: list[str], first_token_texts: list[str], references: list[str | None]) -> dict:
    """Exact-match accuracy on final answers, and how many correct answers the first token already held."""
    predicted = [extract_answer(t) for t in texts]
    graded = [(p, r, f) for p, r, f in zip(predicted, references, first_token_texts) if r is not None]
    correct = [p == r for p, r, _ in graded]
    from_first = sum(1 for (p, r, f), ok in zip(graded, correct) if ok and extract_answer(f) == r)
    return {
        "accuracy": sum(correct) / len(graded) if graded else float("nan"),
        "graded": len(graded),
        "correct": sum(correct),
        "correct_from_first_token": from_first,
    }


# ---------------------------------------------------------------- data and models


def load_eval_examples(config: EvalConfig, tokenizer):
    """data.LoadedData of the held-out file: (context ids, target ids) pairs, truncated, first `limit` kept."""
    from overfill.data import load_examples

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
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "per_position.json").write_text(json.dumps(positions, indent=1) + "\n")
    plot_per_position(positions, out / "per_position.png", modes={n: m["mode"] for n, m in models.items()})
    if reply_rows:
        (out / "replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reply_rows))
    if console is not None:
        print_eval_table(console, results)
        console.print(f"results in [bold]{out}[/] ({results['seconds']:.0f} s)")
    return results


# ---------------------------------------------------------------- reports


def plot_per_position(positions: dict[str, dict], path: Path, *, modes: dict[str, str] | None = None,
                      min_count: int | None = None) -> Path:
    """Paper Figure 8: mean probability of the correct token by reply position, one line per model.

    Positions reached by fewer than `min_count` replies (default: a tenth of them, at least 1) are
    left out, so the tail does not rest on one or two long replies.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pos in positions.items():
        floor = min_count or max(1, math.ceil(0.1 * max(pos["count"])))
        keep = [i for i, c in enumerate(pos["count"]) if c >= floor]
        label = f"{name} ({modes[name]})" if modes and modes[name] != name else name
        ax.plot([pos["position"][i] for i in keep], [pos["mean_prob"][i] for i in keep], label=label, linewidth=1.2)
    ax.axvline(1, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("reply position (1 = first token; from the full model in overfill mode)")
    ax.set_ylabel("mean p(correct token)")
    ax.set_ylim(0, 1)
    ax.set_title("Probability of the correct token by reply position (teacher forced)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


def print_eval_table(console, results: dict) -> None:
    from rich.table import Table

    data = results["data"]
    table = Table(title=f"overfill eval: {data['examples']} examples, {data['target_tokens']} reply tokens", header_style="bold")
    columns = ["model", "mode", "NLL y1", "NLL y2..N", "PPL y2..N", "top-1 y2..N", "y1 share of NLL",
               "agree tok y2..N", "agree exact", "accuracy", "acc from y1"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "mode") else "right")
    for name, m in results["models"].items():
        agree, answers = m.get("agreement", {}), m.get("answers", {})
        from_first = f"{answers['correct_from_first_token']}/{answers['correct']}" if answers else "-"
        table.add_row(name, m["mode"], _fmt(m["nll_token1"]), _fmt(m["nll"]), _fmt(m["ppl"], 2), _fmt(m["top1"], percent=True),
                      _fmt(m["token1_share_of_nll"], percent=True), _fmt(agree.get("token_match"), percent=True),
                      _fmt(agree.get("exact_match"), percent=True), _fmt(answers.get("accuracy"), percent=True), from_first)
    console.print(table)

"""`overfill distill`: the full model's own replies to a file of prompts, as training data for `overfill train`.

Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016): rather than the file's reference
replies, the decoder learns the full model's own outputs, i.e. the sequences it would otherwise
have to continue at inference time. Each prompt is the context training will build from the
record (data/prompts.py); its reply is the full model's, greedy or sampled (engines.py); the
records go to a chat JSONL in prompt order, batch by batch, resumable (output.py).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from overfill.data.examples import split_messages
from overfill.data.prompts import Prompt, load_prompts
from overfill.devices import decide_compile
from overfill.distill.config import DistillConfig
from overfill.distill.engines import VLLM_MAX_TEMPERATURE, TorchEngine, VllmEngine, prompt_seed
from overfill.distill.output import Appender, Resume, check_settings, resume_point, settings_path, write_settings
from overfill.errors import OverfillError
from overfill.generation import context_limit, eos_ids_of


@dataclass
class DistillResult:
    out: str
    engine: str  # torch | vllm
    prompts: int  # usable prompts (within --limit)
    written: int  # replies this run wrote
    already: int  # replies the output held before (a continued run)
    skipped: int  # records that gave no prompt (unreadable, unusable, too long)
    tokens: int  # reply tokens this run generated
    cut: int  # replies that reached --max-new-tokens before an end-of-turn token
    read_back_differently: int  # replies training will read as other tokens than generated (or skip)
    seconds: float
    data: str  # the data summary: what was skipped, by reason and line

    def summary(self) -> str:
        """One line: prompts, replies written, skipped, tokens, seconds, engine."""
        already = f" ({self.already} were there already)" if self.already else ""
        cut = f", {self.cut} cut at --max-new-tokens" if self.cut else ""
        back = (f"; {self.read_back_differently} replies come back as other tokens when training re-tokenizes their text"
                if self.read_back_differently else "")
        return (f"distilled {self.prompts} prompts: {self.written} replies written to {self.out}{already}, "
                f"{self.skipped} record{'' if self.skipped == 1 else 's'} skipped, {self.tokens} reply tokens{cut}, {self.seconds:.0f} s on {self.engine}{back}")


def distill(config: DistillConfig) -> DistillResult:
    """Answer every usable prompt of `config.data` not yet answered in `config.out`, appending the records.

    Checks come before any work and touch no file: vLLM installed (for --engine vllm), the output's
    settings (output.py), the model, the prompts, and every record already written. Interrupted
    (Ctrl-C), it raises KeyboardInterrupt saying how far it got; the same call continues from there.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    config.check_files()  # the prompt file and where the replies go, before any engine starts
    engine_name = config.resolved_engine()
    if engine_name == "vllm":
        from overfill.vllm.runtime import vllm_version

        vllm_version()  # one error line when vLLM is missing
        if config.temperature > VLLM_MAX_TEMPERATURE:
            raise OverfillError(f"vLLM samples at --temperature {VLLM_MAX_TEMPERATURE:g} at most, got {config.temperature:g}: "
                                "lower it, or pass --engine torch")
    out = Path(config.out).expanduser()
    settings = config.settings(engine_name)
    if not config.force:
        check_settings(out, settings)

    def say(text: str) -> None:
        if config.progress:
            tqdm.write(f"overfill distill: {text}", file=sys.stderr)

    model = config.source().load(full_alone=True)
    tokenizer = model.tokenizer
    identity = {"full_fingerprint": model.full_fingerprint,
                "chat_template": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()}
    if not config.force:
        check_settings(out, identity)
    loaded = load_prompts(config.data, tokenizer, prompt_field=config.prompt_field, response_field=config.response_field,
                          limit=config.limit, **_room(model, config.max_new_tokens))
    prompts = loaded.prompts
    say(loaded.summary())
    resume = Resume(0, 0) if config.force else resume_point(out, prompts, limited=config.limit is not None)
    already = resume.done
    pending = prompts[already:]
    result = DistillResult(out=str(out), engine=engine_name, prompts=len(prompts), written=0, already=min(already, len(prompts)),
                           skipped=loaded.skipped_count, tokens=0, cut=0, read_back_differently=0, seconds=0.0,
                           data=loaded.summary())
    if not pending:
        result.seconds = time.perf_counter() - started
        say(f"{out} already answers all {len(prompts)} prompts: nothing to do")
        return result

    if config.force:  # only now, with every check passed
        out.unlink(missing_ok=True)
        settings_path(out).unlink(missing_ok=True)
    write_settings(out, {**settings, **identity}, model=config.model, data=str(Path(config.data).resolve()),
                   prompt_field=config.prompt_field, response_field=config.response_field)
    eos = eos_ids_of(tokenizer, model.full, model.decoder)
    generation = config.generation()
    if engine_name == "torch":
        compile, why = decide_compile(generation.compile, torch.device(config.device), len(pending) * config.max_new_tokens)
        generation = dataclasses.replace(generation, compile=compile)
        say(why)
    if engine_name == "vllm":
        model = None  # vLLM loads its own copy of the weights: ours are freed first
        gc.collect()
        engine = VllmEngine(config.source(), generation, eos_ids=eos, report=_once(say),
                            max_model_len=max(len(p.context_ids) for p in pending) + config.max_new_tokens)
    else:
        engine = TorchEngine(model, generation)
    batch_size = config.resolved_batch_size(engine_name)
    if already:
        say(f"continuing {out} after its {already} records")
    bar = tqdm(total=len(prompts), initial=already, desc="distill", unit="prompt", dynamic_ncols=True,
               disable=not config.progress, file=sys.stderr)
    ok = False
    try:
        with Appender(out, resume) as appender:
            if appender.dropped:
                say(f"dropped a partial last line ({appender.dropped} bytes) left by an interrupted run")
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                replies = engine([p.context_ids for p in batch], [prompt_seed(config.seed, p.context_ids) for p in batch])
                records = [_record(tokenizer, p, ids, eos) for p, ids in zip(batch, replies)]
                appender.write([r for r, _ in records])
                result.written += len(batch)
                result.tokens += sum(len(ids) for ids in replies)
                result.cut += sum(1 for ids in replies if not ids or ids[-1] not in eos)
                result.read_back_differently += sum(1 for _, same in records if not same)
                bar.update(len(batch))
                bar.set_postfix(tokens=result.tokens)
        ok = True
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{already + result.written} of {len(prompts)} replies are in {out}; "
                                "the same command continues from there") from None
    finally:
        bar.close()
        engine.close(ok)
    result.seconds = time.perf_counter() - started
    return result


def _room(model, max_new_tokens: int) -> dict:
    """load_prompts' length limit: the model's positions less the reply's, or none for a model without a known limit."""
    limit = context_limit(model)
    if limit is None:
        return {}
    if max_new_tokens >= limit:
        raise OverfillError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's {limit} positions: "
                            f"lower it below {limit}")
    room = limit - max_new_tokens
    return {"max_context": room, "too_long": f"over {room} prompt tokens (the model's {limit} positions less --max-new-tokens)"}


def _record(tokenizer, prompt: Prompt, ids: list[int], eos: set[int]) -> tuple[dict, bool]:
    """The chat record of one reply, and whether training will read its reply back as these very tokens."""
    text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
    record = {"messages": [*prompt.turns, {"role": "assistant", "content": text}]}
    example = split_messages(tokenizer, record["messages"])
    generated = ids[:-1] if ids and ids[-1] in eos else ids
    target = example.target_ids if example is not None else None
    if target and target[-1] == tokenizer.eos_token_id:  # training's end of turn; ours may be any stop id
        target = target[:-1]
    return record, target == generated and len(example.target_ids) >= 2


def _once(say):
    """`say` for a child's progress lines, each said once (the worker polls its log every few seconds)."""
    said = []

    def report(line: str) -> None:
        if not said or said[-1] != line:
            said.append(line)
            say(f"vLLM: {line}")

    return report

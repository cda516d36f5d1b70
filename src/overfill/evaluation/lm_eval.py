"""lm-evaluation-harness (0.4.13) model `overfill`: any harness task on an OverFill model.

Requests map onto the same two-stage scoring and decoding as `overfill eval`:
- loglikelihood(context, continuation): the prefill model reads the context and scores the first
  continuation token; the decode model scores the rest on its cache (in overfill mode: full model,
  then decoder; `modeling.handoff` through `scoring.reply_logprobs`). is_greedy = every continuation token was the argmax.
- loglikelihood_rolling(text): lm-eval's disjoint rolling windows, each scored the same way (the
  first token of every window is the prefill model's).
- generate_until(context, gen_kwargs): the one generation loop (`generation.generate_ids`) with
  stop strings, from the harness's own prompt text (the chat template is applied only when the
  harness asks for it with --apply_chat_template).

Discovery: lm-eval 0.4.13 finds models only in its own registry and loads no plugins or entry
points (`--include_path` adds tasks, not models). Importing this module registers `overfill`
(`lm_eval.api.registry.register_model`), so run the harness through it:

    python -m overfill.evaluation.lm_eval --model overfill \\
        --model_args path=runs/ckpt,mode=overfill --tasks overfill_two_questions_gen \\
        --include_path tests/lm_eval_task --device cpu

(all arguments are lm-eval's own), or from Python: `import overfill.evaluation.lm_eval` and then
`lm_eval.simple_evaluate(model="overfill", model_args=...)`. model_args: path (checkpoint) or
model + decoder (a pruned folder) or model alone (mode=full), mode, batch_size, max_length,
max_gen_toks, dtype, device (auto, cpu, cuda, cuda:N, mps; lm-eval's --device is passed here too),
compile (true/false; default: decided by device and workload, and logged).
"""

from __future__ import annotations

import logging

from overfill.errors import OverfillError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - depends on the environment
    raise OverfillError("the lm-eval adapter needs lm-evaluation-harness: pip install 'overfill[eval]' (lm-eval==0.4.13)") from None

import torch

from overfill.devices import decide_compile
from overfill.evaluation.scoring import generate_ids_batched, score_examples
from overfill.model_source import ModelSource
from overfill.modeling import check_mode
from overfill.stops import cut_at_stop

log = logging.getLogger(__name__)
MODEL_NAME = "overfill"


class OverFillLM(TemplateLM):
    def __init__(self, path: str | None = None, mode: str = "overfill", model: str | None = None, decoder: str | None = None,
                 batch_size: int | str | None = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str | None = None, trust_remote_code: bool = False, device: str | None = None,
                 compile: bool | str | None = None, **_ignored):
        super().__init__()
        check_mode(mode, "model_args mode")
        if not (path or model):
            raise OverfillError("model_args need path=<OverFill checkpoint>, or model=<full model> with decoder=<pruned folder>")
        if not (path or decoder) and mode != "full":
            raise OverfillError(f"mode {mode} needs a decoder: pass path=<checkpoint> or decoder=<pruned folder>")
        self.mode = mode
        self.source = path or (f"{model}+{decoder}" if decoder else model)
        self.model_source = source = ModelSource(checkpoint=path, model=model, decoder=decoder, dtype=dtype,
                             trust_remote_code=_flag(trust_remote_code), device=device or "auto")
        self._device = torch.device(source.device)
        self.compile = None if compile is None else _flag(compile)
        self.model = source.load(full_alone=True)
        self.tokenizer = self.model.tokenizer
        # lm-eval passes "auto" / "auto:N" from its CLI; there is no memory probing on CPU.
        self.batch_size = int(batch_size) if batch_size is not None and not str(batch_size).startswith("auto") else 8
        self._max_length = int(max_length) if max_length else min(
            getattr(self.model.full.config, "max_position_embeddings", 2048) or 2048, 2048)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # Conditions the first token of an empty context (and of rolling windows).
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.source)).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # A task with a reply prefix (gen_prefix: "The best answer is") ends the history with that assistant turn
        # and asks for no generation prompt: the reply continues it, so the template must leave the turn open.
        continuing = not add_generation_prompt and bool(chat_history) and chat_history[-1].get("role") == "assistant"
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continuing)

    # ------------------------------------------------------------ scoring

    def _score(self, pairs: list[tuple[list[int], list[int]]]):
        """TokenScores for (context ids, continuation ids) pairs; long contexts lose their start."""
        from overfill.data import Example

        examples = []
        for context, continuation in pairs:
            continuation = continuation[-self.max_length :]
            room = max(self.max_length - len(continuation), 1)
            examples.append(Example(list(context[-room:]), list(continuation)))
        return score_examples(self.model, self.mode, examples, batch_size=self.batch_size)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self._score([(context, continuation) for _, context, continuation in requests])
        results = []
        for (pair, _, _), s in zip(requests, scores):
            answer = (float(sum(s.logprobs)), bool(all(s.top1)))
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, s in zip(owners, self._score(windows)):
            totals[index] += float(sum(s.logprobs))
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        groups: dict[tuple, list[int]] = {}
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            stop = tuple(s for s in until if s and s != eos_text)  # the end-of-turn token already ends a row
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            key = (stop, max_new, temperature)
            groups.setdefault(key, []).append(index)
        outputs = [""] * len(requests)
        planned = sum(max_new * len(indices) for (_, max_new, _), indices in groups.items())
        compile, why = decide_compile(self.compile, self._device, planned)
        log.info("overfill: %s", why)
        for (stop, max_new, temperature), indices in groups.items():
            room = max(self.max_length - max_new, 1)
            contexts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            replies = generate_ids_batched(self.model, self.mode, contexts, max_new_tokens=max_new,
                                           batch_size=self.batch_size, stop=stop, temperature=temperature, compile=compile)
            for i, ids in zip(indices, replies):
                outputs[i], _ = cut_at_stop(self.tok_decode([t for t in ids if t != self.eot_token_id]), stop)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs


def _flag(value) -> bool:
    """A model_args switch: lm-eval hands them over as text ('true', 'False', '1') or as bools."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """Make `--model overfill` known to lm-eval (idempotent)."""
    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(OverFillLM)


register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with `overfill` registered: `python -m overfill.evaluation.lm_eval <lm_eval args>`."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except OverfillError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()

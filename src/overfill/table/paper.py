"""The paper's own headline table (Kim et al., "OverFill: Two-Stage Models for Efficient Language Model Decoding",
COLM 2025, arXiv 2508.08446v1), kept beside ours so that every run prints what it should be compared with.

What is recorded here, and where it comes from:
- The tasks are the lm-eval tasks the authors' own evaluation scripts run (github.com/friendshipkim/overfill,
  eval_scripts/overfill_1b.sh: gsm8k_cot_llama, wmt16-de-en, ifeval, arc_challenge_chat, mmlu_llama, nq_open;
  greedy, --apply_chat_template --fewshot_as_multiturn, ARC at 0 shots).
- Table 2 (3B-to-1B: Llama-3.2-3B-Instruct prefill, a 1B width-pruned decoder): the abstract's 83.2% average
  relative improvement of OverFill over the pruned model, and the ARC and MMLU rows (full 78.2 / 63.3,
  pruned 36.4 / 33.7, OverFill 77.8 / 63.7). The other rows' figures could not be read from the stored paper
  text and are left None (shown as "n/a"), never guessed.
- Table 6 (few-shot counts and metrics): where the shot count could not be read from the paper, the count is
  that of the lm-eval task the authors ran (its own `num_fewshot`, or the script's default of 4), and says so
  (`shots_source`).
"""

from __future__ import annotations

PAPER = "Kim et al., OverFill (COLM 2025), Table 2, 3B-to-1B"
PAPER_AVERAGE_RELATIVE_IMPROVEMENT = 83.2  # percent, OverFill over pruned, averaged over tasks (abstract, Table 2)

# task -> configuration -> score (percent; BLEU for wmt16_de_en), None where the figure was not available to us
PAPER_SCORES: dict[str, dict[str, float | None]] = {
    "gsm8k": {"full": None, "pruned": None, "overfill": None},
    "arc": {"full": 78.2, "pruned": 36.4, "overfill": 77.8},
    "mmlu": {"full": 63.3, "pruned": 33.7, "overfill": 63.7},
    "wmt16_de_en": {"full": None, "pruned": None, "overfill": None},
    "ifeval": {"full": None, "pruned": None, "overfill": None},
    "nq_open": {"full": None, "pruned": None, "overfill": None},
}

"""Agreement with the full model: how close is each entry's continuation to what the full model would have said?

The reference is the full model's own greedy reply to each held-out prompt (run.py makes it once
per full model, on our loop or on vLLM). Against it, for every entry (full / overfill / pruned /
refresh):

- teacher forcing on the reference reply, the same one-pass scoring as for reference answers
  (scoring.score_examples): the share of reply tokens 2..N that are the entry's top-1 (token 1
  apart: in overfill mode it is the full model's by construction), the mean NLL of the reference
  tokens, and both by reply position (paper Fig. 8's view);
- greedy generation (when every entry generates): token match, exact match, and how many tokens
  each reply keeps before it first parts from the full model's.

Near-ties. The full model's reply tokens were argmaxes of its generating pass, and the scoring pass
recomputes the same logits with another batch layout (and, with --engine vllm, other kernels), so
they can differ by float noise. A token counts as an entry's top-1 when its log-prob is within
`tie` of the best one (TokenScores.margin <= tie), and the tokens that count only thanks to that
margin are reported as `near_ties`. Measured on SmolLM2-135M: in float32 every one of the full
model's own tokens was its exact teacher-forced argmax; in bfloat16 about 2% were not (exact
ties, and margins up to 0.25 nats: one or two bfloat16 steps of the logits). Hence the defaults.
"""

from __future__ import annotations

import statistics

from overfill.data import Example
from overfill.evaluation.metrics import nll_summary, per_position
from overfill.evaluation.scoring import TokenScores, score_examples

# Log-prob margin below the argmax that still counts as top-1, by the full model's --dtype.
DEFAULT_TIE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}


def reference_examples(contexts: list[list[int]], reference: list[list[int]]) -> list[Example]:
    """The held-out prompts paired with the full model's greedy replies (stop token included, as generated)."""
    return [Example(list(c), list(r)) for c, r in zip(contexts, reference)]


def within_tie(scores: list[TokenScores], tie: float) -> list[TokenScores]:
    """The same scores with top-1 meaning 'within `tie` of the argmax' (see the module docstring)."""
    return [TokenScores(s.logprobs, [m <= tie for m in s.margin], s.margin) for s in scores]


def teacher_forced_agreement(scores: list[TokenScores], tie: float) -> tuple[dict, dict]:
    """Top-1 agreement and NLL on the full model's replies (token 1 apart), and their per-position curve.

    `scores` are an entry's TokenScores on `reference_examples`; per-position "top1" is the share of
    replies whose token k is the entry's top-1, k = 1..N.
    """
    tolerant = within_tie(scores, tie)
    summary = nll_summary(tolerant)
    near = sum(1 for s in scores for exact, m in zip(s.top1[1:], s.margin[1:]) if m <= tie and not exact)
    keep = ("top1_token1", "top1", "nll_token1", "nll", "ppl", "tokens")
    return {**{k: summary[k] for k in keep}, "near_ties": near, "tie": tie}, per_position(tolerant)


def score_agreement(model, mode: str, examples: list[Example], *, tie: float, batch_size: int = 8,
                    refresh_every: int = 0) -> tuple[dict, dict]:
    """One batched teacher-forced pass of `mode` over the reference examples -> teacher_forced_agreement."""
    scores = score_examples(model, mode, examples, batch_size=batch_size, refresh_every=refresh_every)
    return teacher_forced_agreement(scores, tie)


# ---------------------------------------------------------------- greedy generation


def first_divergence(reply: list[int], reference: list[int]) -> int:
    """Tokens `reply` shares with `reference` before the first position where they differ.

    The stop token is a token like any other: both replies stop on the same ids, so a reply that
    ends where the full model's goes on (or goes on where it ends) differs at that position. A
    reply identical to the reference counts its whole length, stop token included (or
    max_new_tokens, when both were cut there); were one a strict prefix of the other, its length.
    """
    same = 0
    while same < min(len(reply), len(reference)) and reply[same] == reference[same]:
        same += 1
    return same


def greedy_agreement(replies: list[list[int]], reference: list[list[int]]) -> dict:
    """Position-wise token match with the full model's greedy replies (over the longer reply), exact match,
    and the tokens before the first divergence (mean and median over replies; token 1 included).

    Token 1 is reported apart: in OverFill both replies take it from the same full-model logits.
    """
    first = [bool(a[:1] == b[:1]) for a, b in zip(replies, reference)]
    matched = compared = 0
    for a, b in zip(replies, reference):
        matched += sum(1 for i in range(1, min(len(a), len(b))) if a[i] == b[i])
        compared += max(max(len(a), len(b)) - 1, 0)
    prefix = [first_divergence(a, b) for a, b in zip(replies, reference)]
    return {
        "token1_match": sum(first) / len(first),
        "token_match": matched / compared if compared else float("nan"),  # tokens 2..N
        "exact_match": sum(a == b for a, b in zip(replies, reference)) / len(replies),
        "first_divergence_mean": sum(prefix) / len(prefix),
        "first_divergence_median": statistics.median(prefix),
    }

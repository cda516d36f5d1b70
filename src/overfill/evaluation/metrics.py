"""The numbers `overfill eval` reports from teacher-forced token scores (docs/design.md, "Measuring it honestly");
agreement.py turns them, and greedy replies, into agreement with the full model.

Token 1 is always reported apart: in OverFill it comes from the full model's prefill logits,
so the headline numbers are over tokens 2..N, what the decoder does.
"""

from __future__ import annotations

import math

from overfill.evaluation.scoring import TokenScores


def nll_summary(scores: list[TokenScores]) -> dict:
    """Token 1 apart, tokens 2..N as the headline (token-weighted means over all replies)."""
    first = [s.logprobs[0] for s in scores]
    rest = [lp for s in scores for lp in s.logprobs[1:]]
    rest_hits = [h for s in scores for h in s.top1[1:]]
    total = -(sum(first) + sum(rest))
    nll = -sum(rest) / len(rest) if rest else float("nan")
    nll_all = total / (len(first) + len(rest))
    return {
        "nll_token1": -sum(first) / len(first),
        "nll": nll,  # tokens 2..N: the decoder's part in OverFill
        "ppl": math.exp(nll) if rest else float("nan"),
        "nll_all": nll_all,
        "ppl_all": math.exp(nll_all),
        "top1_token1": sum(s.top1[0] for s in scores) / len(scores),
        "top1": sum(rest_hits) / len(rest_hits) if rest_hits else float("nan"),
        "token1_share_of_nll": -sum(first) / total if total > 0 else float("nan"),
        "replies": len(scores),
        "tokens": len(rest),
    }


def per_position(scores: list[TokenScores]) -> dict:
    """Mean probability of the correct token, its mean NLL and the top-1 rate at each absolute reply position (1-based lists)."""
    width = max(len(s.logprobs) for s in scores)
    prob, nll, hit, count = [0.0] * width, [0.0] * width, [0] * width, [0] * width
    for s in scores:
        for i, (lp, h) in enumerate(zip(s.logprobs, s.top1)):
            prob[i] += math.exp(lp)
            nll[i] -= lp
            hit[i] += int(h)
            count[i] += 1
    return {
        "position": list(range(1, width + 1)),
        "mean_prob": [p / c for p, c in zip(prob, count)],
        "mean_nll": [x / c for x, c in zip(nll, count)],
        "top1": [h / c for h, c in zip(hit, count)],
        "count": count,
    }

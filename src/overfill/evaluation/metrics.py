"""The numbers `overfill eval` reports, from teacher-forced token scores and greedy replies (DESIGN §1 "Measuring it honestly").

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





def agreement(replies: list[list[int]], reference: list[list[int]]) -> dict:
    """Position-wise token match with the full model's greedy replies (over the longer reply), and exact match.

    Token 1 is reported apart: in OverFill both replies take it from the same full-model logits.
    """
    first = [bool(a[:1] == b[:1]) for a, b in zip(replies, reference)]
    matched = compared = 0
    prefix = []
    for a, b in zip(replies, reference):
        longer = max(len(a), len(b))
        matched += sum(1 for i in range(1, min(len(a), len(b))) if a[i] == b[i])
        compared += max(longer - 1, 0)
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        prefix.append(same)
    return {
        "token1_match": sum(first) / len(first),
        "token_match": matched / compared if compared else float("nan"),  # tokens 2..N
        "exact_match": sum(a == b for a, b in zip(replies, reference)) / len(replies),
        "mean_common_prefix": sum(prefix) / len(prefix),
    }



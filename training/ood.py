"""Out-of-distribution metrics: how well a score (higher: more unusual) tells images of the training
data's distribution ("inside") from others ("outside"). Used by benchmarks/ood.py."""

from __future__ import annotations

import math

import torch


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score(out) > score(in)) + P(equal) / 2, the Mann-Whitney statistic, from average ranks."""
    both = torch.cat([inside, outside]).double()
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    for value in both.unique():  # ties: their average rank
        tied = both == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def threshold_at(inside: torch.Tensor, accept: float) -> float:
    """The smallest of the scores such that at least `accept` of `inside` is at or under it: the
    ceil(accept n)-th smallest (a linear quantile would accept less than asked on few images)."""
    ordered = inside.double().sort().values
    return float(ordered[max(math.ceil(accept * len(ordered) - 1e-9), 1) - 1])


def fpr_at_95(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """The fraction of `outside` accepted by the threshold that accepts 95% of `inside` (score <= it)."""
    return float((outside.double() <= threshold_at(inside, 0.95)).double().mean())

"""Out-of-distribution metrics: how well a score (higher: more unusual) tells images of the training
data's distribution ("inside") from others ("outside"). Used by benchmarks/ood.py."""

from __future__ import annotations

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
    """The smallest score such that at least `accept` of `inside` is at or under it (the quantile with
    interpolation "higher": on few images a linear one would accept less than asked)."""
    return float(torch.quantile(inside.double(), accept, interpolation="higher"))


def fpr_at_95(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """The fraction of `outside` accepted by the threshold that accepts 95% of `inside` (score <= it)."""
    return float((outside.double() <= threshold_at(inside, 0.95)).double().mean())

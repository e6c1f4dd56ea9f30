"""AUROC and FPR at 95% TPR (training/ood.py), against counts written out by hand."""

import itertools

import pytest
import torch

from training.ood import auroc, fpr_at_95, threshold_at


def by_pairs(inside, outside) -> float:
    pairs = list(itertools.product(inside.tolist(), outside.tolist()))
    return sum(1.0 if o > i else 0.5 if o == i else 0.0 for i, o in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_is_the_fraction_of_pairs_the_outside_image_wins_ties_half(seed):
    g = torch.Generator().manual_seed(seed)
    inside, outside = torch.randint(10, (13,), generator=g).double(), torch.randint(12, (9,), generator=g).double()  # many ties
    assert auroc(inside, outside) == pytest.approx(by_pairs(inside, outside), abs=1e-12)


def test_perfect_reversed_and_equal_scores():
    inside, outside = torch.arange(10.0), torch.arange(10.0) + 100
    assert auroc(inside, outside) == 1.0 and auroc(outside, inside) == 0.0
    assert auroc(torch.ones(4), torch.ones(6)) == 0.5
    assert fpr_at_95(inside, outside) == 0.0 and fpr_at_95(outside, inside) == 1.0


def test_fpr_counts_the_outside_images_under_the_threshold_that_accepts_95_percent_inside():
    inside = torch.arange(100.0)  # 95 of them (0..94) at or under 94: exactly 95%
    outside = torch.tensor([10.0, 94.0, 94.1, 200.0])
    assert threshold_at(inside, 0.95) == 94.0 and threshold_at(torch.arange(20.0), 0.95) == 18.0
    assert fpr_at_95(inside, outside) == 0.5  # 10 and 94 are accepted
    small = torch.arange(64.0)
    assert (small <= threshold_at(small, 0.95)).double().mean() >= 0.95  # a linear quantile would accept 60 of 64
    assert (small <= threshold_at(small, 0.95) - 1).double().mean() < 0.95  # and it is the smallest that does

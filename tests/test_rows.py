"""Rows the loss uses, and the unbiased row sample for large heads."""

import torch

from fam_hf.flatness import head_flatness_sum
from fam_hf.rows import sample_rows


def _lm_rows(seed=0, rows=12, dim=5, width=7):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(width, dim, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, width, (rows,), generator=generator)
    labels[[0, 5]] = -100
    return weight, features, features @ weight.T, labels


def test_sampled_rows_estimate_the_full_sum_without_bias():
    weight, features, logits, labels = _lm_rows()
    full = head_flatness_sum(None, weight, None, features, logits, labels)
    generator = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(600):
        f, z, y, counted = sample_rows(features, logits, labels, 3, generator)
        estimates.append(float(head_flatness_sum(None, weight, None, f, z, y).total) * counted / 3)
        assert counted == 10 and (y != -100).all()
    estimates = torch.tensor(estimates, dtype=torch.float64)
    standard_error = float(estimates.std()) / len(estimates) ** 0.5
    assert standard_error > 0
    assert abs(float(estimates.mean()) - float(full.total)) < 5 * standard_error


def test_no_row_is_dropped_when_the_batch_is_small_enough():
    weight, features, logits, labels = _lm_rows()
    f, z, y, counted = sample_rows(features, logits, labels, 10, torch.Generator())
    assert counted is None and f is features and z is logits and y is labels

"""fam_hf.tools.calibration: the expected calibration error by hand, and a causal LM's next-token calibration against
a brute force that predicts each scored token from its prefix alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build

from fam_hf.tools.calibration import expected_calibration_error, next_token_calibration


def test_ece_by_hand():
    # bins of width 0.1: (0.8, 0.9] holds two predictions, one right: |0.5 - 0.9| * 2; (0.5, 0.6]: |1 - 0.6|;
    # (0.2, 0.3]: |0 - 0.3|
    confidence = np.array([0.9, 0.9, 0.6, 0.3])
    correct = np.array([1, 0, 1, 0])
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx((0.8 + 0.4 + 0.3) / 4)
    # one bin: |accuracy - mean confidence| of all
    assert expected_calibration_error(confidence, correct, bins=1) == pytest.approx(abs(0.5 - 0.675))
    # calibrated predictions in every bin: 0
    calibrated = np.repeat([0.25, 0.75], 4)
    hits = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(calibrated, hits, bins=10) == pytest.approx(0.0, abs=1e-15)
    # the edges: 1.0 falls in the last bin, 0.0 in the first
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0]), bins=4) == pytest.approx(0.0)


def test_ece_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="one length"):
        expected_calibration_error(np.array([0.5, 0.6]), np.array([1]))
    with pytest.raises(ValueError, match="no predictions"):
        expected_calibration_error(np.zeros(0), np.zeros(0))


def test_next_token_calibration_matches_prefix_by_prefix_prediction():
    model = build("llama", "causal_lm", seed=3)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 5:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :3] = -100  # a prompt, unscored
    labels[attention_mask == 0] = -100
    batches = [{"input_ids": input_ids[:2], "attention_mask": attention_mask[:2], "labels": labels[:2]}]
    batches.append({"input_ids": input_ids[2:], "attention_mask": attention_mask[2:], "labels": labels[2:]})
    model.train()

    measured = next_token_calibration(model, batches, bins=5)

    assert model.training  # left as it was
    confidence, correct = [], []
    model.eval()
    with torch.no_grad():
        for row in range(3):
            for position in range(1, 7):
                if labels[row, position] == -100:
                    continue
                logits = model(input_ids=input_ids[row : row + 1, :position]).logits[0, -1]
                probabilities = torch.softmax(logits.double(), dim=-1)
                confidence.append(probabilities.max().item())
                correct.append(float(probabilities.argmax().item() == labels[row, position].item()))
    assert len(confidence) == 4 + 4 + 2
    assert measured["confidence"] == pytest.approx(np.mean(confidence), rel=1e-9)
    assert measured["accuracy"] == pytest.approx(np.mean(correct))
    expected = expected_calibration_error(np.array(confidence), np.array(correct), bins=5)
    assert measured["ece"] == pytest.approx(expected, rel=1e-9)

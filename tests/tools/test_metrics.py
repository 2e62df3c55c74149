"""fam_hf.tools.metrics (the demo's and the recipes' metrics): evaluate where it loads, the same numbers here where it
cannot."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest

from fam_hf.tools import metrics


def test_fallback_metrics_equal_a_hand_computation():
    predictions = [0, 0, 1, 1, 2, 2, 2, 1]
    references = [0, 1, 1, 1, 2, 0, 2, 2]
    # per class (tp, predicted, actual): 0 -> (1, 2, 2), 1 -> (2, 3, 3), 2 -> (2, 3, 3)
    assert metrics.accuracy(predictions, references) == pytest.approx(5 / 8)
    assert metrics.f1(predictions, references) == pytest.approx((2 * 1 / 4 + 2 * 2 / 6 + 2 * 2 / 6) / 3)
    # Matthews (multi-class): (correct * n - sum p_k t_k) / sqrt((n^2 - sum p_k^2)(n^2 - sum t_k^2))
    expected = (5 * 8 - (2 * 2 + 3 * 3 + 3 * 3)) / np.sqrt((64 - 22) * (64 - 22))
    assert metrics.matthews_correlation(predictions, references) == pytest.approx(expected)
    binary_predictions, binary_references = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert metrics.f1(binary_predictions, binary_references, average="binary") == pytest.approx(2 * 2 / (3 + 3))
    assert metrics.matthews_correlation([1, 1, 1], [1, 1, 1]) == 0.0  # undefined: no variation


def test_fallback_metrics_agree_with_scikit_learn_and_scipy():
    sklearn = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    assert metrics.f1(predictions, references) == pytest.approx(
        sklearn.f1_score(references, predictions, average="macro")
    )
    assert metrics.matthews_correlation(predictions, references) == pytest.approx(
        sklearn.matthews_corrcoef(references, predictions)
    )
    scores, targets = rng.normal(size=50).round(1), rng.normal(size=50).round(1)  # rounded: ties in the ranks
    assert metrics.pearsonr(scores, targets) == pytest.approx(stats.pearsonr(scores, targets)[0])
    assert metrics.spearmanr(scores, targets) == pytest.approx(stats.spearmanr(scores, targets)[0])


@pytest.fixture
def fake_evaluate(monkeypatch):
    """Replace the ``evaluate`` package; ``set(load)`` decides what ``evaluate.load`` does."""
    module = types.ModuleType("evaluate")
    monkeypatch.setitem(sys.modules, "evaluate", module)
    monkeypatch.setattr(metrics, "_LOADED", {})
    monkeypatch.setattr(metrics, "_WARNED", False)
    return module


def test_metrics_fall_back_with_one_warning_when_evaluate_cannot_load(fake_evaluate):
    def offline(name):
        raise FileNotFoundError(f"Couldn't find a module script for {name}")

    fake_evaluate.load = offline
    compute = metrics.ClassificationMetrics(["accuracy", "f1", "matthews_correlation"], num_labels=3)
    logits = np.eye(3)[[0, 0, 1, 1, 2, 2, 2, 1]]
    labels = np.array([0, 1, 1, 1, 2, 0, 2, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = compute((logits, labels)), compute((logits, labels))
    assert len([w for w in caught if "fam_hf.tools.metrics" in str(w.message)]) == 1
    assert first == second
    assert first["accuracy"] == pytest.approx(5 / 8)
    assert first["f1"] == pytest.approx(metrics.f1(logits.argmax(-1), labels))
    assert first["matthews_correlation"] == pytest.approx(metrics.matthews_correlation(logits.argmax(-1), labels))


def test_metrics_fall_back_with_one_warning_when_evaluate_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # import evaluate raises ImportError
    monkeypatch.setattr(metrics, "_LOADED", {})
    monkeypatch.setattr(metrics, "_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metrics.RegressionMetrics()((np.array([0.1, 0.5, 0.3]), np.array([0.2, 0.4, 0.1])))
    assert len([w for w in caught if "fam_hf.tools.metrics" in str(w.message)]) == 1
    assert result["pearsonr"] == pytest.approx(metrics.pearsonr([0.1, 0.5, 0.3], [0.2, 0.4, 0.1]))


def test_evaluate_is_held_offline_while_it_loads_when_the_hub_is_offline(fake_evaluate, monkeypatch):
    # evaluate reads only HF_EVALUATE_OFFLINE; HF_HUB_OFFLINE (set for the whole test session) must hold it too
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_evaluate.config = types.SimpleNamespace(HF_EVALUATE_OFFLINE=False)
    seen = []

    def load(name):
        seen.append(fake_evaluate.config.HF_EVALUATE_OFFLINE)
        raise FileNotFoundError(f"Couldn't find a module script for {name}")

    fake_evaluate.load = load
    with pytest.warns(UserWarning, match="fam_hf.tools.metrics"):
        assert metrics.compute_metric("accuracy", [1, 0], [1, 1]) == 0.5
    assert seen == [True] and fake_evaluate.config.HF_EVALUATE_OFFLINE is False  # restored after the load
    for name in metrics.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not metrics.hub_offline()
    with metrics._offline_if_asked(fake_evaluate):
        assert fake_evaluate.config.HF_EVALUATE_OFFLINE is False


def test_metrics_come_from_evaluate_when_it_loads(fake_evaluate):
    calls = []

    class Metric:
        def __init__(self, name):
            self.name = name

        def compute(self, predictions, references, **kwargs):
            calls.append((self.name, kwargs))
            return {self.name: 0.125}

    fake_evaluate.load = Metric
    result = metrics.ClassificationMetrics(["accuracy", "f1"], num_labels=2)((np.eye(2)[[0, 1]], np.array([0, 0])))
    assert result == {"accuracy": 0.125, "f1": 0.125}
    assert calls == [("accuracy", {}), ("f1", {"average": "binary"})]

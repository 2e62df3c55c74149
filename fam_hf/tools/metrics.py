"""Metrics for the recipes and the demo: ``evaluate`` where it loads, the same numbers computed here where it cannot.

``evaluate.load("accuracy")`` fetches the metric's script from the Hugging Face Hub, so it fails offline. The
recipes must not crash then, so each metric they report has an equivalent here (plain numpy, no scikit-learn),
used with one warning whenever ``evaluate`` cannot load or run it.

``evaluate`` has its own offline switch, ``HF_EVALUATE_OFFLINE``, and ignores the Hub's: with only ``HF_HUB_OFFLINE=1``
(or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) set it still sends requests, and waits between retries,
before it gives up. Any of those variables therefore puts ``evaluate`` offline here too: it loads a metric from its
local cache, or fails at once and the metric falls back.

Example:
    ```python
    from fam_hf.tools.metrics import ClassificationMetrics

    trainer = FAMTrainer(..., compute_metrics=ClassificationMetrics(["accuracy", "f1"], num_labels=5))
    ```
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ArrayLike = Sequence[int] | np.ndarray


def accuracy(predictions: ArrayLike, references: ArrayLike) -> float:
    """Return the fraction of predictions equal to their reference."""
    predictions, references = _as_labels(predictions, references)
    return float((predictions == references).mean()) if references.size else 0.0


def f1(predictions: ArrayLike, references: ArrayLike, average: str = "macro", pos_label: int = 1) -> float:
    """Return the F1 score: of class ``pos_label`` (``average="binary"``), or the mean over classes (``"macro"``).

    Macro averaging runs over every class that occurs in the predictions or the references, and a class with no
    true positive scores 0, as scikit-learn and ``evaluate`` do.
    """
    predictions, references = _as_labels(predictions, references)
    if average == "binary":
        return _f1_of(predictions, references, pos_label)
    if average != "macro":
        raise ValueError(f"f1 average must be 'binary' or 'macro'; got {average!r}.")
    classes = np.union1d(predictions, references)
    return float(np.mean([_f1_of(predictions, references, c) for c in classes])) if classes.size else 0.0


def matthews_correlation(predictions: ArrayLike, references: ArrayLike) -> float:
    """Return the Matthews correlation coefficient, in its multi-class form (Gorodkin's R_K); 0 when undefined."""
    predictions, references = _as_labels(predictions, references)
    classes = np.union1d(predictions, references)
    predicted = np.array([(predictions == c).sum() for c in classes], dtype=np.float64)
    actual = np.array([(references == c).sum() for c in classes], dtype=np.float64)
    total = float(references.size)
    correct = float((predictions == references).sum())
    numerator = correct * total - predicted @ actual
    denominator = np.sqrt((total**2 - predicted @ predicted) * (total**2 - actual @ actual))
    return float(numerator / denominator) if denominator > 0 else 0.0


def pearsonr(predictions: ArrayLike, references: ArrayLike) -> float:
    """Return Pearson's correlation between predictions and references (for regression tasks such as STS-B)."""
    predictions, references = _as_values(predictions, references)
    predictions, references = predictions - predictions.mean(), references - references.mean()
    denominator = np.sqrt((predictions @ predictions) * (references @ references))
    return float(predictions @ references / denominator) if denominator > 0 else 0.0


def spearmanr(predictions: ArrayLike, references: ArrayLike) -> float:
    """Return Spearman's rank correlation: Pearson's on ranks, tied values sharing their mean rank."""
    predictions, references = _as_values(predictions, references)
    return pearsonr(_ranks(predictions), _ranks(references))


FALLBACKS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearsonr": pearsonr,
    "spearmanr": spearmanr,
}
CLASSIFICATION = ("accuracy", "f1", "matthews_correlation")
REGRESSION = ("pearsonr", "spearmanr")

_LOADED: dict[str, Any] = {}  # metric name -> evaluate module, or None where evaluate could not load it
_WARNED = False
# Any of these set to a true value means "do not reach the Hub"; evaluate itself reads only the last one.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def compute_metric(name: str, predictions: ArrayLike, references: ArrayLike, **kwargs: Any) -> float:
    """Return metric ``name`` through ``evaluate``, or through :data:`FALLBACKS` (warning once) where that fails."""
    if name not in FALLBACKS:
        raise ValueError(f"Unknown metric {name!r}; the recipes report one of {sorted(FALLBACKS)}.")
    module = _load(name)
    if module is not None:
        try:
            return float(module.compute(predictions=predictions, references=references, **kwargs)[name])
        except Exception as error:  # noqa: BLE001 - any failure of an optional backend means: use ours
            _LOADED[name] = None
            _warn_fallback(name, error)
    return FALLBACKS[name](predictions, references, **kwargs)


class ClassificationMetrics:
    """A Trainer ``compute_metrics``: arg-max of the logits, then each named metric, keyed as the metric's name.

    F1 is binary (of class 1) for two classes, as GLUE reports it, and macro-averaged otherwise; pass
    ``f1_average`` to choose.
    """

    def __init__(
        self, names: Sequence[str] = ("accuracy", "f1"), num_labels: int | None = None, f1_average: str | None = None
    ):
        unknown = [name for name in names if name not in CLASSIFICATION]
        if unknown:
            raise ValueError(f"Unknown classification metrics {unknown}; choose from {list(CLASSIFICATION)}.")
        self.names = list(names)
        self.f1_average = f1_average or ("binary" if num_labels == 2 else "macro")

    def __call__(self, eval_prediction: Any) -> dict[str, float]:
        """Return ``{name: value}`` for an ``EvalPrediction`` (or a ``(logits, labels)`` pair)."""
        logits, labels = eval_prediction[0], eval_prediction[1]
        if isinstance(logits, tuple):  # models that return hidden states too: the logits come first
            logits = logits[0]
        predictions = np.asarray(logits).argmax(-1)
        results = {}
        for name in self.names:
            kwargs = {"average": self.f1_average} if name == "f1" else {}
            results[name] = compute_metric(name, predictions, labels, **kwargs)
        return results


class RegressionMetrics:
    """A Trainer ``compute_metrics`` for one real-valued output: Pearson's and Spearman's correlation, and MSE."""

    def __call__(self, eval_prediction: Any) -> dict[str, float]:
        """Return ``{"pearsonr", "spearmanr", "mse"}`` for an ``EvalPrediction`` or a ``(predictions, labels)`` pair."""
        predictions = eval_prediction[0][0] if isinstance(eval_prediction[0], tuple) else eval_prediction[0]
        predictions, labels = _as_values(np.asarray(predictions).reshape(-1), eval_prediction[1])
        results = {name: compute_metric(name, predictions, labels) for name in REGRESSION}
        results["mse"] = float(np.mean((predictions - labels) ** 2))
        return results


def _load(name: str) -> Any:
    if name not in _LOADED:
        try:
            import evaluate

            with _offline_if_asked(evaluate):
                _LOADED[name] = evaluate.load(name)
        except Exception as error:  # noqa: BLE001 - offline, missing package, hub error: all mean "use ours"
            _LOADED[name] = None
            _warn_fallback(name, error)
    return _LOADED[name]


def hub_offline() -> bool:
    """Whether the environment asks the Hugging Face libraries not to reach the Hub (see :data:`OFFLINE_VARIABLES`)."""
    return any(os.environ.get(variable, "").strip().upper() in _TRUE for variable in OFFLINE_VARIABLES)


@contextlib.contextmanager
def _offline_if_asked(evaluate: Any) -> Iterator[None]:
    """Within the block, hold ``evaluate`` offline where :func:`hub_offline` says so (it reads its flag per call)."""
    config = getattr(evaluate, "config", None)
    if not hub_offline() or not hasattr(config, "HF_EVALUATE_OFFLINE"):
        yield
        return
    saved, config.HF_EVALUATE_OFFLINE = config.HF_EVALUATE_OFFLINE, True
    try:
        yield
    finally:
        config.HF_EVALUATE_OFFLINE = saved


def _warn_fallback(name: str, error: BaseException) -> None:
    global _WARNED
    message = (
        f"evaluate could not provide the metric {name!r} ({type(error).__name__}: {str(error)[:160]}); "
        "computing it and any other such metric with fam_hf.tools.metrics instead (same definitions)."
    )
    if _WARNED:
        logger.debug(message)
        return
    _WARNED = True
    warnings.warn(message, stacklevel=3)


def _f1_of(predictions: np.ndarray, references: np.ndarray, label: Any) -> float:
    true_positive = float(((predictions == label) & (references == label)).sum())
    predicted = float((predictions == label).sum())
    actual = float((references == label).sum())
    return 2 * true_positive / (predicted + actual) if predicted + actual else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    _, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _as_values(predictions: ArrayLike, references: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    predictions, references = _as_labels(predictions, references)
    return predictions.astype(np.float64), references.astype(np.float64)


def _as_labels(predictions: ArrayLike, references: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    predictions, references = np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.size} predictions for {references.size} references.")
    return predictions, references

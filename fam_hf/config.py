"""``FAMTrainingArguments``: the Trainer's arguments plus the settings of the relative-flatness penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .defaults import DEFAULT_MODE, DEFAULT_SHARE, GRADIENT_CHOICES, LOSSES

FAM_FIELDS = (
    "fam_lambda",
    "fam_share",
    "fam_layer",
    "fam_normalize",
    "fam_gradient",
    "fam_loss",
    "fam_max_rows",
    "sam_rho",
)


@dataclass
class FAMTrainingArguments(TrainingArguments):
    r"""[`~transformers.TrainingArguments`] for [`FAMTrainer`]: every Trainer setting, plus those of FAM.

    The training objective is ``task_loss + fam_lambda * relative_flatness(head)`` on every training batch.

    Parameters that control the penalty's weight:

        fam_lambda (`float` or `None`, *optional*, defaults to `None`):
            Weight of the relative-flatness penalty. `0` switches FAM off (training is then identical to the
            Trainer's). `None` sets it on the first training batch so that the penalty is `fam_share` of the task
            loss there. The scale of relative flatness grows with the head's width and the size of its features
            (a BERT-base classifier starts near 100, a small ViT near 10), so no fixed number is a safe default
            across models, while a share of the loss is.
        fam_share (`float` or `None`, *optional*, defaults to `None`, meaning `0.001`):
            With `fam_lambda=None`, the penalty's share of the task loss on the first training batch, with the
            penalty as the step computes it (exact, or the unbiased estimate of `fam_max_rows`). Pilots on
            held-out tasks found harm from 1% (`"full"`) or 10% (`"head"`, `"weights"`) upwards, no significant
            gain anywhere, and a hint of one only at 0.1% on noisy labels; so 0.1% is the default, as the setting
            least likely to hurt. `docs/benchmarks.md` has the evidence as it
            stands. Setting it together with a nonzero `fam_lambda` is an error: the share would be ignored.

    Parameters that control what the penalty measures:

        fam_layer (`str`, *optional*):
            Dotted name of the head, the linear layer from the penultimate features to the logits (for example
            `"classifier.out_proj"`). `None` finds it: the usual classification heads, then
            `get_output_embeddings()`.
        fam_normalize (`bool`, *optional*, defaults to `False`):
            Divide relative flatness by the head's input width, the "normalized trace" of the authors' code.
        fam_loss (`str`, *optional*, defaults to `"auto"`):
            The loss whose Hessian defines the penalty: `"auto"` follows the model (its task and `problem_type`),
            or one of `"cross_entropy"`, `"mse"`, `"bce"`.

        fam_max_rows (`"auto"`, `int` or `None`, *optional*, defaults to `"auto"`):
            How many counted rows (tokens) of each training batch the penalty is computed from. `"auto"` keeps the
            penalty exact where the head is narrow against the model (classifiers: every row) and, where it is wide
            (a language model's head), estimates it without bias from a share of the batch's rows chosen so that
            the penalty costs about 3% of a step (at least 32 rows; the share follows the batch). An `int` is a
            fixed number of rows per batch; `None` (or `"all"` on the command line) always uses every row, the exact
            penalty. Evaluation always uses every row.

    Sharpness-aware minimization, to compare FAM with or to combine it with:

        sam_rho (`float`, *optional*, defaults to `0.0`):
            SAM's neighbourhood radius (Foret et al., 2021; 0.05 is the usual value). `> 0` makes every optimizer
            step a SAM step: a first pass for the gradient, a second at the weights moved `rho` along it, and the
            step with the second gradient, at about twice the cost. With FAM on, the penalty is in both passes.
            `0` switches it off.

    Parameters that control what the penalty trains:

        fam_gradient (`str`, *optional*, defaults to `"auto"`):
            `"full"`: the exact gradient of the penalty, into the head and, through the features and the
            predictions, into the backbone. `"head"`: the exact gradient with respect to the head's weight and
            bias only, features held constant, so the backbone learns from the task loss alone. `"weights"`: the
            Hessian traces held constant, as in the authors' code: a data-dependent decay of the head's weight.
            `"auto"` is `"head"` where the head trains and `"full"` where it is frozen (LoRA on the backbone, the
            most common language-model finetune), said once when training starts. `"head"` is preferred because
            `"full"` can lower the penalty by shrinking the backbone's features until the predictions go flat,
            which pilots measured as harm already at a 1% penalty share; `"head"` cannot do that, and is exact for
            the parameters it trains. An explicit `"head"` or `"weights"` on a frozen head is refused.
    """

    fam_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the relative-flatness penalty; 0 switches FAM off; unset: chosen on the first batch "
            "so that the penalty is fam_share of the task loss."
        },
    )
    fam_share: float | None = field(
        default=None,
        metadata={
            "help": f"With fam_lambda unset: the penalty's share of the task loss on the first training batch "
            f"(default {DEFAULT_SHARE:g})."
        },
    )
    fam_layer: str | None = field(
        default=None,
        metadata={
            "help": "Dotted name of the head (the linear layer producing the logits); unset: found automatically."
        },
    )
    fam_normalize: bool = field(default=False, metadata={"help": "Divide relative flatness by the head's input width."})
    fam_gradient: str = field(
        default=DEFAULT_MODE,
        metadata={
            "help": "What the penalty trains: full, head, weights, or auto (default: head, or full on a frozen head).",
            "choices": list(GRADIENT_CHOICES),
        },
    )
    fam_loss: str = field(
        default="auto",
        metadata={
            "help": "Loss whose Hessian defines the penalty: auto, cross_entropy, mse or bce.",
            "choices": ["auto", *LOSSES],
        },
    )

    fam_max_rows: str | None = field(
        default="auto",
        metadata={
            "help": "Rows (tokens) per training batch the penalty is computed from: auto (exact for classifiers, an "
            "unbiased sample costing about 3% of a step for language-model heads), a number, or all (exact)."
        },
    )

    sam_rho: float = field(
        default=0.0,
        metadata={
            "help": "SAM's neighbourhood radius: > 0 makes every step a SAM step (two passes, the penalty in both); "
            "0 is off."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_fam_settings()

    def check_fam_settings(self) -> None:
        """Validate the ``fam_*`` fields and normalize ``fam_max_rows``; raise a ``ValueError`` naming the fix.

        Also called when each training run starts, because a hyperparameter-search trial writes its values onto
        the arguments without running ``__post_init__``.
        """
        if self.fam_lambda is not None and not (math.isfinite(self.fam_lambda) and self.fam_lambda >= 0):
            raise ValueError(f"fam_lambda must be a finite number >= 0 (0 switches FAM off); got {self.fam_lambda}.")
        if self.fam_share is not None and not (math.isfinite(self.fam_share) and self.fam_share > 0):
            raise ValueError(f"fam_share must be > 0; got {self.fam_share}. Use fam_lambda=0 to switch FAM off.")
        if self.fam_share is not None and self.fam_lambda:
            raise ValueError(
                f"fam_lambda={self.fam_lambda} and fam_share={self.fam_share} are both set, and a given fam_lambda "
                "ignores the share. Set one: fam_lambda for a fixed weight, or fam_share (with fam_lambda unset) for "
                "a weight calibrated on the first batch."
            )
        self.fam_max_rows = _parse_max_rows(self.fam_max_rows)
        if not self.sam_rho >= 0:
            raise ValueError(f"sam_rho must be >= 0 (0 switches SAM off); got {self.sam_rho}.")
        if self.fam_gradient not in GRADIENT_CHOICES:
            raise ValueError(f"fam_gradient must be one of {GRADIENT_CHOICES}; got {self.fam_gradient!r}.")
        if self.fam_loss not in ("auto", *LOSSES):
            raise ValueError(
                f"fam_loss must be 'auto', 'cross_entropy', 'mse' or 'bce'; got {self.fam_loss!r}. "
                "For another loss, call fam_hf.relative_flatness with a callable loss."
            )

    @property
    def resolved_fam_share(self) -> float:
        """The share ``fam_lambda=None`` calibrates to: ``fam_share``, or the default when it is unset."""
        return DEFAULT_SHARE if self.fam_share is None else self.fam_share

    def fam_settings(self) -> dict:
        """Return the FAM fields as a plain dict, as saved beside checkpoints."""
        return {name: getattr(self, name) for name in FAM_FIELDS}


def _parse_max_rows(value: str | int | None) -> str | int | None:
    """Return ``"auto"``, a positive row count, or ``None`` (every row), from Python or command-line values."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        if value.lower() in ("all", "none"):
            return None
        if value.strip().isdigit():
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(
        f"fam_max_rows must be 'auto', a positive number of rows, or None / 'all' (every row); got {value!r}."
    )

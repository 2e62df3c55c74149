"""``FAMTrainingArguments``: the Trainer's arguments plus the settings of the relative-flatness penalty."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .flatness import GRADIENT_MODES

FAM_FIELDS = ("fam_lambda", "fam_share", "fam_layer", "fam_normalize", "fam_gradient", "fam_loss", "fam_max_rows")


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
        fam_share (`float`, *optional*, defaults to `0.001`):
            With `fam_lambda=None`, the penalty's share of the task loss on the first training batch. Pilots on
            held-out tasks found harm from 1% (`"full"`) or 10% (`"head"`, `"weights"`) upwards, no significant
            gain anywhere, and a hint of one only at 0.1% on noisy labels; so 0.1% is the default, as the setting
            least likely to hurt. `docs/benchmarks.md` has the evidence as it stands.

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

        fam_max_rows (`int`, *optional*):
            Estimate the training penalty from at most this many randomly drawn counted rows (tokens) per batch,
            scaled to an unbiased estimate of the full penalty. `None` uses every row. For a language model's head
            the penalty costs about as much as the head itself per row, so a few hundred rows of a long batch
            keep its cost small; evaluation always uses every row.

    Parameters that control what the penalty trains:

        fam_gradient (`str`, *optional*, defaults to `"head"`):
            `"full"`: the exact gradient of the penalty, into the head and, through the features and the
            predictions, into the backbone. `"head"`: the exact gradient with respect to the head's weight and
            bias only, features held constant, so the backbone learns from the task loss alone. `"weights"`: the
            Hessian traces held constant, as in the authors' code: a data-dependent decay of the head's weight.
            The default is `"head"` because `"full"` can lower the penalty by shrinking the backbone's features
            until the predictions go flat, which pilots measured as harm already at a 1% penalty share; `"head"`
            cannot do that, and is exact for the parameters it trains.
    """

    fam_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the relative-flatness penalty; 0 switches FAM off; unset: chosen on the first batch "
            "so that the penalty is fam_share of the task loss."
        },
    )
    fam_share: float = field(
        default=0.001,
        metadata={"help": "With fam_lambda unset: the penalty's share of the task loss on the first training batch."},
    )
    fam_layer: str | None = field(
        default=None,
        metadata={
            "help": "Dotted name of the head (the linear layer producing the logits); unset: found automatically."
        },
    )
    fam_normalize: bool = field(default=False, metadata={"help": "Divide relative flatness by the head's input width."})
    fam_gradient: str = field(
        default="head",
        metadata={"help": "What the penalty trains: full, head (default) or weights.", "choices": list(GRADIENT_MODES)},
    )
    fam_loss: str = field(
        default="auto",
        metadata={
            "help": "Loss whose Hessian defines the penalty: auto, cross_entropy, mse or bce.",
            "choices": ["auto", "cross_entropy", "mse", "bce"],
        },
    )

    fam_max_rows: int | None = field(
        default=None,
        metadata={"help": "Estimate the training penalty from at most this many random rows (tokens) per batch."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fam_lambda is not None and not self.fam_lambda >= 0:
            raise ValueError(f"fam_lambda must be >= 0 (0 switches FAM off); got {self.fam_lambda}.")
        if not self.fam_share > 0:
            raise ValueError(f"fam_share must be > 0; got {self.fam_share}. Use fam_lambda=0 to switch FAM off.")
        if self.fam_max_rows is not None and self.fam_max_rows < 1:
            raise ValueError(
                f"fam_max_rows must be a positive number of rows or None (all rows); got {self.fam_max_rows}."
            )
        if self.fam_gradient not in GRADIENT_MODES:
            raise ValueError(f"fam_gradient must be one of {GRADIENT_MODES}; got {self.fam_gradient!r}.")
        if self.fam_loss not in ("auto", "cross_entropy", "mse", "bce"):
            raise ValueError(
                f"fam_loss must be 'auto', 'cross_entropy', 'mse' or 'bce'; got {self.fam_loss!r}. "
                "For another loss, call fam_hf.relative_flatness with a callable loss."
            )

    def fam_settings(self) -> dict:
        """Return the FAM fields as a plain dict, as saved beside checkpoints."""
        return {name: getattr(self, name) for name in FAM_FIELDS}

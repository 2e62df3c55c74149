"""What the penalty can reach in a trainer: the gradient mode that trains something, and losses FAM cannot see.

Two ways a run could carry FAM's name and do nothing: a penalty whose gradient reaches no trainable parameter (the
modes that train the head alone, on a frozen head: LoRA on the backbone), and a trainer whose ``compute_loss``
computes its loss without the Trainer's (sentence-transformers' loss modules), so that nothing can be added to it.
The first resolves ``fam_gradient="auto"`` to what can act; both are refused, with the ways out, where they cannot.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import textwrap
from typing import Any

from torch import nn

from .head import _active_module

logger = logging.getLogger(__name__)

# How an override may hand the loss on: through super() (super().compute_loss, super(Cls, self), or a method looked up
# on it by name), or a FAM class's compute_loss by name. Only an override that does neither is refused when built.
_CALLS_SUPER = re.compile(r"\bsuper\s*\(")
_CALLS_BY_NAME = re.compile(r"\b([A-Za-z_]\w*)\.compute_loss\s*\(\s*self\b")
# Libraries whose trainers compute the loss with a module of their own, outside the model.
_LOSS_MODULE_LIBRARIES = {
    "sentence_transformers": "sentence-transformers computes it with a loss module outside the model "
    "(MultipleNegativesRankingLoss, CoSENTLoss, BinaryCrossEntropyLoss, ...) from embeddings or scores that no "
    "linear head produces as logits",
    "setfit": "setfit trains through a sentence-transformers trainer, whose loss is a module outside the model",
}


def resolve_gradient(mode: str, head: nn.Module, head_name: str) -> str:
    """Return the ``fam_gradient`` mode a run uses: ``"auto"`` resolved, an explicit mode checked against the head.

    ``"auto"`` is ``"head"`` where the head has a trainable weight and ``"full"`` where it is frozen, said once; an
    explicit ``"head"`` or ``"weights"`` on a frozen head is refused, since training would be plain training while
    the logs showed a penalty.
    """
    if mode == "full":
        return mode  # the penalty also reaches the backbone through the features and predictions
    trainable = [n for n, p in _active_module(head).named_parameters() if p.requires_grad]
    if mode == "weights":
        trainable = [n for n in trainable if not n.endswith("bias")]
    if mode == "auto":
        if any(not n.endswith("bias") for n in trainable):
            return "head"
        logger.warning(
            "FAM: the head %r is frozen (LoRA adapters on the backbone, say), so fam_gradient='auto' trains with "
            "'full': the penalty's exact gradient reaches the trainable parameters through the features. Set "
            "fam_gradient explicitly to choose another mode.",
            head_name,
        )
        return "full"
    if trainable:
        return mode
    raise ValueError(
        f"FAM cannot act: fam_gradient={mode!r} trains only the head {head_name!r}, and none of its parameters is "
        "trainable (a frozen head, or LoRA adapters on the backbone only), so training would be plain training "
        "while the logs showed a penalty. Choose one: fam_gradient='auto' or 'full' (the penalty trains the backbone "
        "through the features); LoRA on the head (add its name to target_modules); the head in PEFT's "
        "modules_to_save; or fam_lambda=0 to only measure relative flatness."
    )


def bypassed_loss(trainer_class: type, mixin: type) -> str | None:
    """Return why ``trainer_class`` computes its loss where FAM cannot add to it, or ``None``.

    That is a ``compute_loss`` defined above ``mixin`` (FAM's) in the class's bases that never hands the loss on to
    the Trainer's. Read from its source, so it is known when the trainer is built; a method whose source cannot be
    read is left to the first step's check (``FAMMixin.training_step``).
    """
    mro = trainer_class.__mro__
    if mixin not in mro:
        return None
    for owner in [c for c in mro[: mro.index(mixin)] if "compute_loss" in vars(c)]:
        try:
            source = textwrap.dedent(inspect.getsource(vars(owner)["compute_loss"]))
        except (OSError, TypeError):
            return None
        if _CALLS_SUPER.search(source):
            continue  # the next compute_loss in the bases decides
        namespace = vars(sys.modules.get(owner.__module__, object))
        called = [namespace.get(name) for name in _CALLS_BY_NAME.findall(source)]
        if any(isinstance(c, type) and issubclass(c, mixin) for c in called):
            return None
        break
    else:
        return None
    library = owner.__module__.split(".")[0]
    how = _LOSS_MODULE_LIBRARIES.get(library, "it computes the loss without passing it through FAM's")
    return (
        f"FAM cannot see the loss {trainer_class.__name__} trains on: {owner.__module__}.{owner.__qualname__}."
        f"compute_loss never calls FAM's compute_loss, the next one in its bases ({how}), so no penalty can be "
        "added to it and no "
        "relative flatness measured. Run it without FAM: fam_lambda=0 (fam-hf launch --fam_lambda 0 -- ...) is the "
        "plain run, bit for bit. A subclass of your own can call super().compute_loss(model, inputs, "
        "return_outputs, num_items_in_batch) instead."
    )


def warn_unmeasured(trainer: Any, reason: str) -> None:
    """Say once that, at ``fam_lambda=0``, FAM measures nothing in this trainer and why."""
    logger.warning("FAM: fam_lambda=0 and FAM cannot measure %s, so it is off: %s", type(trainer).__name__, reason)

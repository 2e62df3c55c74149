"""FAM on the Hub: the model card a FAM trainer writes says whether it was trained with FAM, and with which settings.

The card is the parent trainer's own (transformers' ``TrainingSummary``, or TRL's template for TRL trainers),
written as usual; FAM's part is then added to the README.md it wrote: the ``fam`` tag in the YAML header, the
``fam_*`` settings and the resolved ``fam_lambda`` and ``fam_share`` in the hyperparameters list, and one sentence
on what FAM is. At ``fam_lambda=0`` FAM only measured relative flatness: the card has no tag and says so instead
(and, with ``sam_rho > 0``, that the model was trained with SAM).
``fam_config.json``, which ``FAMMixin.save_model`` writes beside the weights, is uploaded with them: ``push_to_hub``
saves the model into ``output_dir`` and uploads that whole folder (it ignores only ``_*`` and ``checkpoint-*``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from huggingface_hub import ModelCard

FAM_TAG = "fam"
FAM_SENTENCE = (
    "This model was trained with FAM, Relative Flatness Aware Minimization "
    "([Adilova et al., 2023](https://arxiv.org/abs/2307.02337)), which adds to the training loss `fam_lambda` times "
    "the relative flatness of the head, the layer that maps the penultimate features to the outputs "
    '(Petzka et al., "Relative Flatness and Generalization", NeurIPS 2021), with the fam_hf library.'
)
MEASURED_SENTENCE = (
    "The fam_hf library measured the relative flatness of this model's head during training (Petzka et al., "
    '"Relative Flatness and Generalization", NeurIPS 2021), but did not train on it: with `fam_lambda=0`, FAM '
    "([Adilova et al., 2023](https://arxiv.org/abs/2307.02337)) adds nothing to the training loss."
)
SAM_SENTENCE = (
    "This model was trained with SAM, Sharpness-Aware Minimization "
    "([Foret et al., 2021](https://arxiv.org/abs/2010.01412)), with `sam_rho={rho}`, with the fam_hf library."
)
HYPERPARAMETERS_INTRO = "The following hyperparameters were used during training:\n"


def trained_with_fam(trainer: Any) -> bool:
    """Whether the penalty was on: a nonzero resolved ``fam_lambda``, or ``fam_lambda=None`` not yet calibrated."""
    resolved = getattr(trainer, "fam_lambda", None)
    fam_lambda = resolved if resolved is not None else trainer.args.fam_lambda
    return fam_lambda is None or fam_lambda != 0


def fam_summary(trainer: Any) -> str:
    """Return what the card says of FAM (and SAM): trained with FAM, or only measured at ``fam_lambda=0``."""
    sentences = [FAM_SENTENCE if trained_with_fam(trainer) else MEASURED_SENTENCE]
    rho = float(getattr(trainer.args, "sam_rho", 0.0) or 0.0)
    if rho > 0:
        sentences.append(SAM_SENTENCE.format(rho=trainer.args.sam_rho))
    return " ".join(sentences)


def fam_hyperparameters(trainer: Any) -> dict[str, Any]:
    """Return the FAM settings of a trainer's arguments (``fam_*``, ``sam_rho``), with the ``fam_share`` and the
    ``fam_lambda`` in use."""
    settings = dict(trainer.args.fam_settings())
    if trainer.args.fam_lambda is None:  # calibrated: the share in use, its default when unset
        settings["fam_share"] = trainer.args.resolved_fam_share
    else:
        settings["fam_share"] = f"not used (fam_lambda={trainer.args.fam_lambda} is given)"
    resolved = getattr(trainer, "fam_lambda", settings.get("fam_lambda"))
    settings["fam_lambda (resolved)"] = resolved if resolved is not None else "not yet resolved (no training step)"
    return settings


def create_fam_model_card(trainer: Any, create_card: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Write the trainer's model card to ``output_dir/README.md`` with FAM's tag, settings and a sentence on FAM.

    ``create_card`` is the parent trainer's ``create_model_card`` (transformers' or TRL's), called with ``args``
    and ``kwargs``; the ``fam`` tag joins ``tags`` when the penalty was on. Only the main process writes, as in the
    Trainer.
    """
    tagged = trained_with_fam(trainer)
    bound = inspect.signature(create_card).bind_partial(*args, **kwargs)
    if tagged:
        tags = bound.arguments.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        bound.arguments["tags"] = tags + [FAM_TAG] if FAM_TAG not in tags else tags
    create_card(*bound.args, **bound.kwargs)
    path = os.path.join(trainer.args.output_dir, "README.md")
    if not trainer.is_world_process_zero() or not os.path.exists(path):
        return
    add_fam_to_model_card(path, fam_hyperparameters(trainer), fam_summary(trainer), tagged)


def add_fam_to_model_card(path: str, hyperparameters: dict[str, Any], summary: str, tagged: bool = True) -> None:
    """Add the FAM hyperparameters and the ``summary`` sentence to the model card at ``path``, and the ``fam`` tag
    when ``tagged``."""
    card = ModelCard.load(path)
    tags = list(card.data.tags or [])
    if tagged and FAM_TAG not in tags:
        card.data.tags = tags + [FAM_TAG]
    lines = "".join(f"- {name}: {value}\n" for name, value in hyperparameters.items())
    text = card.text
    if HYPERPARAMETERS_INTRO in text:  # transformers' card: extend its list
        start = text.index(HYPERPARAMETERS_INTRO) + len(HYPERPARAMETERS_INTRO)
        end = text.find("\n\n", start)  # the list ends at a blank line (an item may span lines: the optimizer's)
        end = len(text) if end < 0 else end + 1
        text = text[:end] + lines + text[end:]
    else:  # another card (TRL's template): a list of its own
        text = text.rstrip("\n") + "\n\n### FAM hyperparameters\n\n" + lines
    procedure = "## Training procedure\n"
    if procedure in text:
        at = text.index(procedure) + len(procedure)
        text = text[:at] + "\n" + summary + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n## FAM\n\n" + summary + "\n"
    card.text = text
    card.save(path)

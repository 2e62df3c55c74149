"""FAM on the Hub: the model card a FAM trainer writes says it was trained with FAM, and with which settings.

The card is the parent trainer's own (transformers' ``TrainingSummary``, or TRL's template for TRL trainers),
written as usual; FAM's part is then added to the README.md it wrote: the ``fam`` tag in the YAML header, the
``fam_*`` settings and the resolved ``fam_lambda`` in the hyperparameters list, and one sentence on what FAM is.
``fam_config.json``, which ``FAMMixin.save_model`` writes beside the weights, is uploaded with them: ``push_to_hub``
saves the model into ``output_dir`` and uploads that whole folder (it ignores only ``_*`` and ``checkpoint-*``).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from huggingface_hub import ModelCard

FAM_TAG = "fam"
FAM_SENTENCE = (
    "This model was trained with FAM, Relative Flatness Aware Minimization "
    "([Adilova et al., 2023](https://arxiv.org/abs/2307.02337)), which adds to the training loss `fam_lambda` times "
    "the relative flatness of the head, the layer that maps the penultimate features to the outputs "
    '(Petzka et al., "Relative Flatness and Generalization", NeurIPS 2021), with the fam_hf library.'
)
HYPERPARAMETERS_INTRO = "The following hyperparameters were used during training:\n"


def fam_hyperparameters(trainer: Any) -> dict[str, Any]:
    """Return the FAM settings of a trainer's arguments (``fam_*``, ``sam_rho``) and the ``fam_lambda`` in use."""
    settings = dict(trainer.args.fam_settings())
    resolved = getattr(trainer, "fam_lambda", settings.get("fam_lambda"))
    settings["fam_lambda (resolved)"] = resolved if resolved is not None else "not yet resolved (no training step)"
    return settings


def create_fam_model_card(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """Write the trainer's model card to ``output_dir/README.md`` with FAM's tag, settings and a sentence on FAM.

    ``args`` and ``kwargs`` are those of the parent trainer's ``create_model_card`` (transformers' or TRL's); the
    ``fam`` tag joins ``tags``. Only the main process writes, as in the Trainer.
    """
    create_card = _parent_create_model_card(trainer)
    bound = inspect.signature(create_card).bind_partial(*args, **kwargs)
    tags = bound.arguments.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    bound.arguments["tags"] = tags + [FAM_TAG] if FAM_TAG not in tags else tags
    create_card(*bound.args, **bound.kwargs)
    path = os.path.join(trainer.args.output_dir, "README.md")
    if not trainer.is_world_process_zero() or not os.path.exists(path):
        return
    add_fam_to_model_card(path, fam_hyperparameters(trainer))


def add_fam_to_model_card(path: str, hyperparameters: dict[str, Any]) -> None:
    """Add the ``fam`` tag, the FAM hyperparameters and the sentence on FAM to the model card at ``path``."""
    card = ModelCard.load(path)
    tags = list(card.data.tags or [])
    if FAM_TAG not in tags:
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
        text = text[:at] + "\n" + FAM_SENTENCE + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n## FAM\n\n" + FAM_SENTENCE + "\n"
    card.text = text
    card.save(path)


def _parent_create_model_card(trainer: Any):
    """The ``create_model_card`` of the trainer's class after :class:`~fam_hf.FAMMixin` (that override calls us)."""
    from .trainer import FAMMixin

    if isinstance(trainer, FAMMixin):
        return super(FAMMixin, trainer).create_model_card
    return trainer.create_model_card

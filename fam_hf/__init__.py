"""fam_hf: Relative Flatness Aware Minimization (FAM) as a one-line change to a transformers Trainer."""

from .callback import RelativeFlatnessCallback
from .certificate import LossMismatchError
from .config import FAMTrainingArguments
from .flatness import flatness_sum, inputs_for_gradient, relative_flatness
from .head import find_head
from .measure import FlatnessReport, measure_relative_flatness
from .probe import FlatnessProbe
from .run import FAMState
from .sam import SAMMixin
from .seq2seq import FAMSeq2SeqTrainer, FAMSeq2SeqTrainingArguments
from .trainer import FAMMixin, FAMTrainer

__version__ = "0.1.0"

__all__ = [
    "FAMMixin",
    "FAMSeq2SeqTrainer",
    "FAMSeq2SeqTrainingArguments",
    "FAMState",
    "FAMTrainer",
    "FAMTrainingArguments",
    "FlatnessProbe",
    "FlatnessReport",
    "LossMismatchError",
    "RelativeFlatnessCallback",
    "SAMMixin",
    "find_head",
    "flatness_sum",
    "inputs_for_gradient",
    "measure_relative_flatness",
    "relative_flatness",
]

"""Moved to :mod:`fam_hf.commands.demo` (``fam-hf demo``; measuring a saved model to :mod:`fam_hf.commands.measure`)."""

from .commands.demo import *  # noqa: F403
from .commands.measure import measure_saved_model  # noqa: F401

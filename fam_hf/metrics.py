"""Moved to :mod:`fam_hf.tools.metrics` (the metrics the demo and the recipes compute); this name re-exports it."""

from .tools.metrics import *  # noqa: F403

"""Moved to :mod:`fam_hf.tools.plotting`; this name re-exports it."""

from .tools.plotting import *  # noqa: F403

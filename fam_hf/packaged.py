"""Moved to :mod:`fam_hf.tools.packaged` (the tools' and recipes' packaged models and data); this name re-exports it."""

from .tools.packaged import *  # noqa: F403

"""Moved to :mod:`fam_hf.commands.demo_lm` (``fam-hf demo --task causal-lm``; its headline task to
:mod:`fam_hf.tools.packaged`); this name re-exports both."""

from .commands.demo_lm import *  # noqa: F403
from .tools.packaged import HEADLINE_DATA, SYSTEM_PROMPT, headline_examples, load_headline_task, split_headline  # noqa: F401

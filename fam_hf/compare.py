"""Moved to :mod:`fam_hf.commands.compare` (a package, one module per job); this name re-exports it."""

from .commands.compare import *  # noqa: F403
from .commands.compare import __all__, compare_command, main  # noqa: F401

run = compare_command  # the entry's name before the move

if __name__ == "__main__":  # python -m fam_hf.compare
    raise SystemExit(main())

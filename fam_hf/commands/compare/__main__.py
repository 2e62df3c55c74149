"""``python -m fam_hf.commands.compare [options] -- COMMAND ...``: the same as ``fam-hf compare``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m fam_hf.commands``: the ``fam-hf`` command line."""

import sys

from .fam_hf_cli import main

sys.exit(main())

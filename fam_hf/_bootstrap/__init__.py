"""The folder ``fam-hf launch`` puts first on ``PYTHONPATH``: its ``sitecustomize`` instruments every Python process
started below the launch (see :mod:`fam_hf.launch_instrument`)."""

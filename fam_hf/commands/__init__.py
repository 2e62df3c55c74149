"""The tools built on the library, one module per ``fam-hf`` command (after accelerate's ``commands`` layout):
``demo`` (and ``demo_lm``, its ``--task causal-lm``), ``measure``, ``plot`` and the ``compare`` package;
``fam_hf_cli`` assembles them into ``fam-hf``. Nothing here is imported by the library (``fam_hf``'s own modules).
"""

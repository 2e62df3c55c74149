"""Helpers the tools (``fam_hf.commands``), the recipes and the benchmarks share, never the library: real models and
data from PyPI (``packaged``), plots of runs and of paired differences (``plotting``), evaluation metrics without a
hub (``metrics``), the paired-seed statistics (``stats``)."""

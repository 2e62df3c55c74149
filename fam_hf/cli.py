"""Moved to :mod:`fam_hf.commands.fam_hf_cli`; this name re-exports ``main`` (``python -m fam_hf.cli`` still works)."""

from .commands.fam_hf_cli import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())

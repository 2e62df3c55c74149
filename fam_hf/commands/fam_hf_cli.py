"""The ``fam-hf`` command: ``demo`` (FAM against plain finetuning on real data), ``measure``, ``plot``, ``compare``,
``launch``.

fam-hf demo                                  # offline: MiniLM on BBC News, with and without FAM
fam-hf demo --task causal-lm                 # offline: SmolLM2 + LoRA writes BBC headlines, with and without FAM
fam-hf measure --model fam_demo/fam --data bbc-news --max_samples 500
fam-hf plot fam_demo/no_fam fam_demo/fam --output runs.png
fam-hf compare --arms plain fam sam --seeds 5 -- python my_train.py --output_dir x   # does FAM help my task?
fam-hf launch run_glue.py --model_name_or_path ... --fam_share 0.001   # FAM in a script nobody edited

Each command is a module of :mod:`fam_hf.commands` with its ``<name>_command_parser(subparsers)`` and
``<name>_command(args)``; this one only assembles them.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from ..tools.packaged import LoadError
from .compare import compare_command_parser
from .demo import demo_command_parser
from .launch import launch_command_parser
from .measure import measure_command_parser
from .plot import plot_command_parser

COMMANDS = (
    demo_command_parser,
    measure_command_parser,
    plot_command_parser,
    compare_command_parser,
    launch_command_parser,
)


def main(argv: list[str] | None = None) -> int:
    """Run the ``fam-hf`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if not getattr(args, "quiet", True):  # fam-hf launch: the script's own logging stays as it is
            return args.run(args)
        with _quiet_transformers():
            return args.run(args)
    except LoadError as error:
        print(f"fam-hf {args.command}: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf`` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="fam-hf", description="Relative Flatness Aware Minimization for transformers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{demo,measure,plot,compare,launch}")
    for command_parser in COMMANDS:
        command_parser(subparsers)
    return parser


@contextmanager
def _quiet_transformers():
    """Drop transformers' load reports (keeping the Trainer's progress bars) while a command runs, then restore
    the log level: the command line may quiet the library, library calls never change it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


if __name__ == "__main__":
    sys.exit(main())

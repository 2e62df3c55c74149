"""``fam-hf launch``: run a training script nobody edited with FAM (the launcher is :mod:`fam_hf.launch`).

fam-hf launch run_glue.py --model_name_or_path ... --output_dir out --fam_share 0.001
fam-hf launch -m my_package.train --output_dir out
"""

from __future__ import annotations

import argparse


def launch_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf launch``: a sub-parser of ``subparsers``, or a parser of its own."""
    description = "run a transformers training script, unmodified, with FAM (its Trainer becomes FAMTrainer)"
    # Every argument after ``launch`` is the launcher's (``-m MODULE``, ``-h``) or the script's, verbatim: no option
    # prefix here, so that argparse takes none of them (the launcher parses its own, :func:`fam_hf.launch.main`).
    options = dict(description=description, prefix_chars="+", add_help=False)
    if subparsers is not None:
        parser = subparsers.add_parser("launch", help=description, **options)
    else:
        parser = argparse.ArgumentParser("fam-hf launch", **options)
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="(SCRIPT.py | -m MODULE) ARGS",
        help="what to run, and its arguments",
    )
    parser.set_defaults(run=launch_command, quiet=False)  # the script's logging is its own: leave it as it is
    return parser


def launch_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf launch``: the script under the launcher; return its exit status."""
    from ..launch import main

    return main(list(args.command))

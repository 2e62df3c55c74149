"""``fam-hf launch``: run a training command nobody edited with FAM (the launcher is :mod:`fam_hf.launch`).

fam-hf launch run_glue.py --model_name_or_path ... --output_dir out --fam_share 0.001
fam-hf launch -m my_package.train --output_dir out
fam-hf launch llamafactory-cli train cfg.yaml              # an installed console script, by name
fam-hf launch --fam_share 0.05 --seed 3 -- axolotl train cfg.yml   # settings for every trainer of the run
"""

from __future__ import annotations

import argparse


def launch_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf launch``: a sub-parser of ``subparsers``, or a parser of its own."""
    description = (
        "run a transformers training command, unmodified, with FAM (its Trainer becomes FAMTrainer, in every Python "
        "process it starts); options before -- (--quiet, any FAMTrainingArguments field: --fam_share 0.05 --seed 3 "
        "--output_dir out) are the launcher's and win over the command's own values"
    )
    # Every argument after ``launch`` is the launcher's (``--FIELD VALUE``, ``--quiet``, ``-m MODULE``, ``-h``) or the
    # command's, verbatim: no option prefix here, so that argparse takes none of them (the launcher parses its own,
    # :func:`fam_hf.launch.main`).
    options = dict(description=description, prefix_chars="+", add_help=False)
    if subparsers is not None:
        parser = subparsers.add_parser("launch", help=description, **options)
    else:
        parser = argparse.ArgumentParser("fam-hf launch", **options)
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="[--quiet] [--FIELD VALUE ... --] (SCRIPT.py | -m MODULE | CONSOLE_SCRIPT) ARGS",
        help="the launcher's options, then what to run and its arguments",
    )
    parser.set_defaults(run=launch_command, quiet=False)  # the script's logging is its own: leave it as it is
    return parser


def launch_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf launch``: the command under the launcher; return its exit status."""
    from ..launch import main

    return main(list(args.command))

"""``fam-hf plot``: task loss, relative flatness and eval accuracy of runs, side by side, from their trainer_state.json.

fam-hf plot fam_demo/no_fam fam_demo/fam --output runs.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tools.packaged import LoadError


def plot_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf plot``: a sub-parser of ``subparsers``, or a parser of its own."""
    description = "plot task loss, relative flatness and eval accuracy of runs"
    if subparsers is not None:
        parser = subparsers.add_parser("plot", help=description)
    else:
        parser = argparse.ArgumentParser("fam-hf plot", description=description)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run (with trainer_state.json)")
    parser.add_argument("--output", default="fam_runs.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--title", default=None)
    parser.set_defaults(run=plot_command)
    return parser


def plot_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf plot``: write the PNG; return the exit status."""
    from ..tools.plotting import plot_runs

    try:
        path = plot_runs(args.run_dirs, Path(args.output), title=args.title)
    except (FileNotFoundError, ImportError) as error:
        raise LoadError(str(error)) from error
    print(f"Wrote {path}")
    return 0

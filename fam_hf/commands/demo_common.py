"""What ``fam-hf demo``'s two tasks share (:mod:`.demo` for text classification, :mod:`.demo_lm` for the causal
LM): the error the command line prints, the settings from its options, the training arguments of one run and the
text table of the results."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..tools.packaged import LoadError


class DemoError(LoadError):
    """A problem the user can fix (a bad path, too few examples); the CLI prints it without a traceback."""


TEXT_ONLY = ("text_column", "label_column")
LM_ONLY = ("lora_r", "samples", "max_new_tokens")


def demo_settings(args: argparse.Namespace, settings_class: type, only: tuple[str, ...]):
    """Return ``settings_class`` from the options given, the task's defaults for the others."""
    wrong = [f"--{name}" for name in only if getattr(args, name) is not None]
    if wrong:
        raise LoadError(f"{', '.join(wrong)} do not apply to --task {args.task}.")
    names = [name for name in vars(settings_class()) if name not in ("install", "plot")]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return settings_class(**given, install=not args.no_install, plot=not args.no_plot)


def demo_arguments(output_dir: str | Path, settings: Any, fam_lambda: float | None, logs_per_eval: int):
    """Return the ``FAMTrainingArguments`` of one demo run: ``settings``' steps, batch, learning rate (linear decay
    after a 10% warm-up), evaluation every ``eval_steps`` with ``logs_per_eval`` training logs in between."""
    import torch

    from fam_hf import FAMTrainingArguments

    return FAMTrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=max(1, settings.max_steps // 10),
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        logging_steps=max(1, settings.eval_steps // logs_per_eval),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=settings.seed,
        fam_lambda=fam_lambda,
        fam_gradient=settings.fam_gradient,
        **({"fam_share": settings.fam_share} if fam_lambda is None else {}),  # the share sets an unset fam_lambda only
    )


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Return the lines of a plain-text table: columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines

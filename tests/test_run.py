"""FAM's run state follows the Trainer: model_init, search trials, resumed runs, a frozen head, the row budget."""

import logging

import pytest
import torch
from tiny_models import (
    as_dataset,
    assert_updates_close,
    batch_for,
    build,
    collator,
    expected_update,
    sgd_args,
    snapshot,
    updates,
)
from transformers import TrainerCallback

from fam_hf import FAMTrainer, FAMTrainingArguments, FlatnessProbe
from fam_hf.rows import AUTO_ROWS_MINIMUM, AutoRows
from fam_hf.run import FAMState, LossRecorder


def test_model_init_trains_the_model_it_builds_with_the_exact_penalty(tmp_path):
    """The Trainer builds a new model in train(); the probe must watch that one, not the one from __init__."""
    batch = batch_for(build("bert", "sequence"))
    expected = expected_update(build("bert", "sequence"), batch, fam_lambda=2.0, gradient="head")
    trainer = FAMTrainer(
        model_init=lambda: build("bert", "sequence"),
        args=sgd_args(tmp_path, batch_size=8, fam_lambda=2.0),
        train_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
    )
    constructed = trainer.model
    before = snapshot(build("bert", "sequence"))
    trainer.train()
    assert trainer.model is not constructed
    assert_updates_close(updates(before, trainer.model), expected)


class _LogRecorder(TrainerCallback):
    """Keeps (fam_share, fam_lambda, relative_flatness, task_loss) of each trial's first training log."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "fam_lambda" in logs and state.global_step == 1:
            self.seen.append((args.fam_share, logs["fam_lambda"], logs["relative_flatness"], logs["task_loss"]))


def test_search_trials_each_calibrate_their_own_lambda(tmp_path):
    """Two optuna trials with different fam_share: each run resolves lambda from its own share, in proportion."""
    pytest.importorskip("optuna")
    batch = batch_for(build("bert", "sequence"))
    recorder = _LogRecorder()
    args = sgd_args(tmp_path, batch_size=8, fam_share=0.01)
    args.max_steps = 2
    trainer = FAMTrainer(
        model_init=lambda trial=None: build("bert", "sequence"),
        args=args,
        train_dataset=as_dataset(batch),
        eval_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
        callbacks=[recorder],
    )
    import optuna

    trainer.hyperparameter_search(
        hp_space=lambda trial: {"fam_share": trial.suggest_categorical("fam_share", [0.01, 0.04])},
        backend="optuna",
        n_trials=2,
        direction="minimize",
        sampler=optuna.samplers.GridSampler({"fam_share": [0.01, 0.04]}),
    )
    recorder.seen.sort()
    assert [share for share, *_ in recorder.seen] == [0.01, 0.04]
    (_, lambda_1, flatness_1, task_1), (_, lambda_4, flatness_4, task_4) = recorder.seen
    assert (flatness_4, task_4) == pytest.approx((flatness_1, task_1), rel=1e-12)  # same model, same first batch
    assert lambda_4 == pytest.approx(4 * lambda_1, rel=1e-9)
    assert lambda_1 * flatness_1 == pytest.approx(0.01 * task_1, rel=1e-6)  # calibrated in float32


def _resumable_args(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=2,
        max_steps=6,
        logging_steps=2,
        save_steps=4,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=7,
        fam_share=0.05,
    )
    return FAMTrainingArguments(output_dir=str(tmp_path), **{**settings, **overrides})


def _fam_logs(trainer):
    keys = ("loss", "task_loss", "relative_flatness", "fam_lambda")
    return {e["step"]: tuple(e[k] for k in keys) for e in trainer.state.log_history if "task_loss" in e}


def test_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path):
    """Resume from checkpoint-4 with logging every 2 steps: step 6's logs equal the uninterrupted run's."""
    whole = _resumable_trainer(_resumable_args(tmp_path / "whole"))
    whole.train()
    resumed = _resumable_trainer(_resumable_args(tmp_path / "whole"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    expected, actual = _fam_logs(whole), _fam_logs(resumed)
    assert set(expected) == set(actual) == {2, 4, 6}  # the resumed history starts with the checkpoint's 2 and 4
    assert actual[6] == pytest.approx(expected[6], rel=1e-9)
    assert resumed.fam_lambda == whole.fam_lambda  # restored from the checkpoint, not recalibrated at step 5


def _resumable_trainer(args: FAMTrainingArguments) -> FAMTrainer:
    """A BERT classifier over 12 examples: 6 steps of 2, checkpoints every 4 steps, logs every 2."""
    return FAMTrainer(
        model=build("bert", "sequence"),
        args=args,
        train_dataset=as_dataset(batch_for(build("bert", "sequence"), size=12)),
        data_collator=collator(torch.float64),
    )


def test_checkpoint_state_carries_the_resolved_lambda_in_the_trainer_state(tmp_path):
    import json

    first = _resumable_trainer(_resumable_args(tmp_path))
    first.train()
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["FAMState"]["args"]
    assert saved["fam_lambda"] == first.fam_lambda > 0
    assert saved["settings"]["fam_share"] == 0.05


def test_resume_with_a_changed_share_recalibrates_and_says_so(tmp_path, caplog):
    first = _resumable_trainer(_resumable_args(tmp_path))
    first.train()
    args = _resumable_args(tmp_path)
    args.fam_share = 0.1
    changed = _resumable_trainer(args)
    with caplog.at_level(logging.WARNING, logger="fam_hf.trainer"):
        changed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert "differ from the checkpoint" in caplog.text and "fam_share" in caplog.text
    assert changed.fam_lambda != first.fam_lambda


def test_frozen_head_is_refused_with_the_ways_out(tmp_path):
    model = build("bert", "sequence")
    model.classifier.requires_grad_(False)
    batch = batch_for(model)
    for mode in ("head", "weights"):
        trainer = FAMTrainer(
            model=model,
            args=sgd_args(tmp_path, fam_lambda=1.0, fam_gradient=mode),
            train_dataset=as_dataset(batch),
            data_collator=collator(model.dtype),
        )
        refusal = "FAM cannot act.*fam_gradient='auto' or 'full'.*modules_to_save.*fam_lambda=0"
        with pytest.raises(ValueError, match=refusal):
            trainer.train()


def test_frozen_head_still_trains_the_backbone_in_full_mode_and_measures_at_lambda_zero(tmp_path):
    model = build("bert", "sequence")
    model.classifier.requires_grad_(False)
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="full")
    actual, _ = _train(model, batch, tmp_path, fam_lambda=2.0, fam_gradient="full")
    assert_updates_close(actual, expected)
    _, trainer = _train(build("bert", "sequence").requires_grad_(True), batch, tmp_path, fam_lambda=0.0)
    assert next(e for e in trainer.state.log_history if "loss" in e)["relative_flatness"] > 0


def test_lora_on_the_head_acts(tmp_path):
    peft = pytest.importorskip("peft")
    batch = batch_for(build("bert", "sequence"))
    with_head = peft.get_peft_model(
        build("bert", "sequence"), peft.LoraConfig(r=2, target_modules=["query", "value", "classifier"])
    )
    expected = expected_update(with_head, batch, fam_lambda=2.0, gradient="head")
    actual, _ = _train(with_head, batch, tmp_path, fam_lambda=2.0)
    assert_updates_close(actual, expected)


def _train(model, batch, tmp_path, **fam):
    before = snapshot(model)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, **fam),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    )
    trainer.train()
    return updates(before, model), trainer


def test_max_rows_parses_from_the_command_line():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(FAMTrainingArguments)
    for given, parsed in (("auto", "auto"), ("64", 64), ("all", None)):
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--use_cpu", "--fam_max_rows", given])
        assert args.fam_max_rows == parsed
    assert FAMTrainingArguments(output_dir="x", use_cpu=True).fam_max_rows == "auto"
    with pytest.raises(ValueError, match="fam_max_rows must be"):
        FAMTrainingArguments(output_dir="x", use_cpu=True, fam_max_rows=0)


def test_fam_state_reads_back_from_a_trainer_state_json(tmp_path):
    from transformers import TrainerState

    state = TrainerState(stateful_callbacks=[FAMState(0.25, {"fam_share": 0.01})])
    state.save_to_json(tmp_path / "state.json")
    loaded = FAMState.saved(TrainerState.load_from_json(tmp_path / "state.json"))
    assert (loaded.fam_lambda, loaded.settings) == (0.25, {"fam_share": 0.01})


def test_a_run_that_raised_leaves_nothing_behind_for_the_next(tmp_path):
    """train() that fails never reaches on_train_end; the next run must undo its loss wrappers and hooks."""

    def summed_loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs["logits"], labels)

    model = build("bert", "sequence")
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")  # the first run stops on a non-finite penalty
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=1.0),
        train_dataset=as_dataset(batch_for(model)),
        data_collator=collator(model.dtype),
        compute_loss_func=summed_loss,
    )
    with pytest.raises(ValueError, match="penalty is"):
        trainer.train()
    with torch.no_grad():
        model.classifier.weight[0, 0] = 0.1
    trainer.train()
    assert trainer.compute_loss_func is summed_loss
    assert not model._forward_hooks  # the run's loss hook is gone; only the probe's head hook remains
    assert next(e for e in trainer.state.log_history if "loss" in e)["relative_flatness"] > 0


def _lm_trainer(output_dir, **extra) -> FAMTrainer:
    """A tiny Llama at the default row budget, 8 steps of 8 examples (40 counted tokens, of which "auto" samples
    its minimum of 32), checkpoint at 4."""
    model = build("llama", "causal_lm")
    args = _resumable_args(output_dir, per_device_train_batch_size=8, max_steps=8, seed=3, fam_gradient="full", **extra)
    data = as_dataset(batch_for(model, size=64))
    return FAMTrainer(model=model, args=args, train_dataset=data, data_collator=collator(torch.float64))


def test_resume_at_the_default_row_budget_equals_the_uninterrupted_run(tmp_path):
    """The sampling stream continues from the checkpoint (FAMState.draws), as the Trainer's own resume does."""
    whole = _lm_trainer(tmp_path)
    whole.train()
    assert isinstance(whole.fam_probe().max_rows, AutoRows), "the default must sample this head's rows"
    assert whole.fam_probe().max_rows(40) == AUTO_ROWS_MINIMUM < 40, "the default must sample in this test"
    assert whole.fam_probe().draws == 8  # one draw a step, the calibrating first batch's too
    resumed = _lm_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.fam_probe().draws == 8
    for (name, expected), actual in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_each_process_draws_its_own_stream_and_a_draw_is_replayable():
    model = build("llama", "causal_lm")
    batch = batch_for(model, size=16)
    rank_0 = FlatnessProbe(model, max_rows=4, seed=3, stream=0)
    rank_1 = FlatnessProbe(model, max_rows=4, seed=3, stream=1)

    def draws(probe, count=3):
        values = []
        for _ in range(count):
            with torch.no_grad(), probe.watch(batch, batch["labels"], gradient=None, sample=True) as seen:
                model(**batch)
            values.append(float(seen[0].flatness.total))
        return values

    first_0, first_1 = draws(rank_0), draws(rank_1)
    assert len(set(first_0)) == 3 and first_0 != first_1  # new rows every draw, other rows on the other rank
    rank_0.draws = 1
    assert draws(rank_0, 2) == first_0[1:]  # the stream is a function of (seed, stream, draws) alone
    rank_0.remove()
    rank_1.remove()


def test_lambda_is_calibrated_on_the_penalty_the_first_step_trains_on(tmp_path):
    """Exact or estimated from a row sample (fam_max_rows=3 of 40 counted rows), the calibrated lambda makes the first
    step's penalty, as that step computes it, fam_share of its task loss: the first step costs what the others do."""
    for max_rows in (None, 3):
        trainer = _lm_trainer(tmp_path / str(max_rows), fam_max_rows=max_rows, fam_share=0.01, logging_steps=1)
        trainer.args.max_steps = 1
        trainer.train()
        first = next(entry for entry in trainer.state.log_history if "relative_flatness" in entry)
        penalty = first["relative_flatness"]
        assert trainer.fam_lambda * penalty == pytest.approx(0.01 * first["task_loss"], rel=1e-6)
        assert trainer.fam_probe().draws == (1 if max_rows else 0)


def test_loss_recorder_survives_pickle_and_deepcopy():
    import copy
    import pickle

    from transformers.trainer_pt_utils import LabelSmoother

    recorder = LossRecorder(LabelSmoother(epsilon=0.1), [])
    logits, labels = torch.zeros(1, 3, 4), torch.tensor([[0, 1, -100]])
    for clone in (pickle.loads(pickle.dumps(recorder)), copy.deepcopy(recorder)):
        value = clone({"logits": logits}, labels)
        assert float(value) == pytest.approx(float(torch.log(torch.tensor(4.0))))
        assert len(clone._record) == 1 and clone.epsilon == 0.1  # records, and reads through to the smoother

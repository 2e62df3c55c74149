"""RelativeFlatnessCallback: relative flatness in any Trainer's logs, exact, without changing the loss."""

import copy
import functools
import logging
import math
import pickle

import pytest
import torch
from tiny_models import as_dataset, batch_for, build, collator, tiny_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from fam_hf import measure_relative_flatness
from fam_hf.callback import RelativeFlatnessCallback
from fam_hf.rows import UnsupportedTaskError


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=3,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


class Recorder(TrainerCallback):
    """Stands in for a reporter: the Trainer runs report_to callbacks before the ones it is given."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _expected(model, batch, batch_size=4) -> float:
    report = measure_relative_flatness(
        model, as_dataset(batch), batch_size=batch_size, collate_fn=collator(model.dtype), progress=False
    )
    return report.relative_flatness


def test_evaluate_logs_the_relative_flatness_of_the_whole_eval_set(tmp_path):
    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model, size=10)  # batches of 4, 4 and 2
    reporter = Recorder()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        eval_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        callbacks=[reporter, RelativeFlatnessCallback()],
    )
    metrics = trainer.evaluate()
    expected = _expected(model, batch)
    assert metrics["eval_relative_flatness"] == pytest.approx(expected, rel=1e-6)
    assert trainer.state.log_history[-1]["eval_relative_flatness"] == metrics["eval_relative_flatness"]
    assert reporter.logs[-1]["eval_relative_flatness"] == metrics["eval_relative_flatness"]
    assert "eval_loss" in metrics

    named = trainer.evaluate(metric_key_prefix="held_out")
    assert named["held_out_relative_flatness"] == pytest.approx(expected, rel=1e-6)
    predicted = trainer.predict(as_dataset(batch))
    assert predicted.metrics["test_relative_flatness"] == pytest.approx(expected, rel=1e-6)


def test_training_with_the_callback_is_bit_identical_and_logs_every_n_steps(tmp_path):
    batch = batch_for(build("bert", "sequence", dtype=torch.float32), size=24)
    models = []
    trainers = []
    for callbacks in ([], [RelativeFlatnessCallback(train_every=2)]):
        model = build("bert", "sequence", dtype=torch.float32)
        trainer = Trainer(
            model=model,
            args=_args(tmp_path, max_steps=5, logging_steps=100),
            train_dataset=as_dataset(batch),
            data_collator=collator(model.dtype),
            callbacks=callbacks,
        )
        trainer.train()
        models.append(model)
        trainers.append(trainer)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), name
    logged = {e["step"]: e for e in trainers[1].state.log_history if "relative_flatness" in e}
    assert sorted(logged) == [2, 4]
    assert all(
        "loss" in e and e["relative_flatness"] > 0 and math.isfinite(e["relative_flatness"]) for e in logged.values()
    )
    assert not any("relative_flatness" in e for e in trainers[0].state.log_history)


def test_the_measured_training_batch_is_the_first_of_its_step(tmp_path):
    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model, size=8)
    reference = _expected(copy.deepcopy(model), {k: v[:4] for k, v in batch.items()})
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, gradient_accumulation_steps=2, learning_rate=0.0),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        callbacks=[RelativeFlatnessCallback(train_every=1)],
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "relative_flatness" in e)
    assert entry["step"] == 1
    assert entry["relative_flatness"] == pytest.approx(reference, rel=1e-6)


def test_model_init_binds_to_the_model_the_trainer_builds(tmp_path):
    """With model_init, train() builds another model than the one of __init__: the hooks must follow it."""
    built = []

    def model_init():
        built.append(build("bert", "sequence", seed=len(built), dtype=torch.float32))
        return built[-1]

    batch = batch_for(built[0] if built else build("bert", "sequence"), size=8)
    trainer = Trainer(
        model_init=model_init,
        args=_args(tmp_path, max_steps=2),
        train_dataset=as_dataset(batch),
        eval_dataset=as_dataset(batch),
        data_collator=collator(torch.float32),
        callbacks=[RelativeFlatnessCallback()],
    )
    trainer.train()
    assert trainer.model is built[-1] and len(built) == 2
    metrics = trainer.evaluate()
    assert metrics["eval_relative_flatness"] == pytest.approx(_expected(trainer.model, batch), rel=1e-6)


def test_a_model_whose_loss_is_unknown_is_refused_when_the_trainer_is_built(tmp_path):
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 3)

        def forward(self, x, labels=None):
            return {"logits": self.classifier(x)}

    with pytest.raises(UnsupportedTaskError, match="RelativeFlatnessCallback cannot measure.*cannot tell which loss"):
        Trainer(model=Custom(), args=_args(tmp_path), callbacks=[RelativeFlatnessCallback()])


def test_a_trainer_with_its_own_loss_is_told_once(tmp_path, caplog):
    class DoubledLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = build("bert", "sequence", dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="fam_hf.callback"):
        DoubledLoss(model=model, args=_args(tmp_path), callbacks=[RelativeFlatnessCallback()])
    warnings = [r.message for r in caplog.records if "computes its own loss" in r.message]
    assert len(warnings) == 1 and "DoubledLoss.compute_loss overrides" in warnings[0]


def test_a_model_whose_loss_differs_from_the_head_is_flagged_on_the_first_eval_batch(tmp_path, caplog):
    model = build("bert", "sequence", dtype=torch.float32)
    model.config.problem_type = "single_label_classification"
    forward = model.forward

    @functools.wraps(forward)  # the Trainer keeps the columns the forward's signature names
    def scaled_loss(*args, **kwargs):  # a model family that adds something to its loss
        output = forward(*args, **kwargs)
        output.loss = output.loss * 1.5
        return output

    model.forward = scaled_loss
    batch = batch_for(model, size=8)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        eval_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        callbacks=[RelativeFlatnessCallback()],
    )
    with caplog.at_level(logging.WARNING, logger="fam_hf.certificate"):
        trainer.evaluate()
        trainer.evaluate()
    warnings = [r.getMessage() for r in caplog.records if "cannot certify" in r.getMessage()]
    assert len(warnings) == 1 and "the loss that the model (BertForSequenceClassification) returned" in warnings[0]
    assert "divides (or weights) its rows differently" in warnings[0]


def test_callback_pickles_and_a_deep_copy_of_the_model_is_not_measured(tmp_path):
    model = build("bert", "sequence", dtype=torch.float32)
    callback = RelativeFlatnessCallback(train_every=3)
    Trainer(model=model, args=_args(tmp_path), callbacks=[callback])
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.train_every == 3 and clone._model is None
    copied = copy.deepcopy(model).eval()
    with torch.no_grad():
        copied(**batch_for(model, size=4))
    assert callback._eval_sums is None


def test_added_after_construction_it_reports_from_the_next_whole_evaluation(tmp_path, caplog):
    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model, size=10)
    trainer = Trainer(
        model=model, args=_args(tmp_path), eval_dataset=as_dataset(batch), data_collator=collator(model.dtype)
    )
    trainer.add_callback(RelativeFlatnessCallback())
    with caplog.at_level(logging.WARNING, logger="fam_hf.callback"):
        first = trainer.evaluate()
    assert "eval_relative_flatness" not in first
    assert any("second batch" in r.getMessage() for r in caplog.records)
    assert trainer.evaluate()["eval_relative_flatness"] == pytest.approx(_expected(model, batch), rel=1e-6)


def test_dpo_trainer_logs_eval_relative_flatness_and_says_whose_loss_it_is(tmp_path, caplog):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = build("llama", "causal_lm", dtype=torch.float32)
    reference = copy.deepcopy(model)
    words = [f"w{i}" for i in range(3, 40)]
    rows = {
        "prompt": [" ".join(words[i : i + 3]) for i in range(6)],
        "chosen": [" ".join(words[i + 3 : i + 5]) for i in range(6)],
        "rejected": [" ".join(words[i + 10 : i + 13]) for i in range(6)],
    }
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    with caplog.at_level(logging.WARNING, logger="fam_hf.callback"):
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_dict(rows),
            eval_dataset=Dataset.from_dict(rows),
            processing_class=tiny_tokenizer(),
            callbacks=[RelativeFlatnessCallback(train_every=1)],
        )
        trainer.train()
        metrics = trainer.evaluate()
    value = metrics["eval_relative_flatness"]
    assert value > 0 and math.isfinite(value)
    assert trainer.state.log_history[-1]["eval_relative_flatness"] == value
    assert [e["step"] for e in trainer.state.log_history if "relative_flatness" in e] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if "computes its own loss" in r.getMessage()]
    assert (
        len(warnings) == 1 and "DPOTrainer" in warnings[0] and "not of the loss this trainer optimizes" in warnings[0]
    )


def _smoothed_or_own_loss(setting: str) -> dict:
    """Trainer settings under which the Trainer pops ``labels`` before the forward pass and computes the loss."""
    if setting == "label_smoothing":
        return {"args": {"label_smoothing_factor": 0.1}}

    def shifted_cross_entropy(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"][:, :-1].reshape(-1, outputs["logits"].shape[-1])
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))

    return {"compute_loss_func": shifted_cross_entropy}


@pytest.mark.parametrize("setting", ["label_smoothing", "compute_loss_func"])
def test_labels_the_trainer_pops_still_select_the_measured_rows(setting, tmp_path):
    """The Trainer pops labels before the forward pass; the callback measures the rows they select, not every
    position (the -100 ones included)."""
    model = build("llama", "causal_lm", dtype=torch.float32)
    batch = batch_for(model, size=8)
    settings = _smoothed_or_own_loss(setting)
    args = _args(tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=8, **settings.pop("args", {}))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=as_dataset(batch),
        eval_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        callbacks=[RelativeFlatnessCallback(train_every=1)],
        **settings,
    )
    expected = _expected(copy.deepcopy(model), batch)  # the copy's hooks are inert
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "relative_flatness" in e)
    assert entry["relative_flatness"] == pytest.approx(expected, rel=1e-6)
    assert trainer.evaluate()["eval_relative_flatness"] == pytest.approx(expected, rel=1e-6)


class EvalModeForward(TrainerCallback):
    """Runs the model in eval mode between training steps, as TRL's reference precomputation does."""

    def __init__(self, batch):
        self.batch = batch

    def on_step_end(self, args, state, control, model=None, **kwargs):
        stray_eval_forward(model, self.batch)


def stray_eval_forward(model, batch):
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()


def test_an_eval_mode_forward_outside_evaluation_is_not_an_evaluation_batch(tmp_path):
    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model, size=10)
    stray = batch_for(model, size=4, seed=5)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2, logging_steps=1, learning_rate=0.0),
        train_dataset=as_dataset(batch),
        eval_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        callbacks=[RelativeFlatnessCallback(), EvalModeForward(stray)],
    )
    trainer.train()
    assert not any("eval_relative_flatness" in e for e in trainer.state.log_history)
    stray_eval_forward(model, stray)
    assert trainer.evaluate()["eval_relative_flatness"] == pytest.approx(_expected(model, batch), rel=1e-6)


def test_a_training_forward_without_gradient_is_not_the_measured_batch(tmp_path):
    """TRL's KTO runs a no-grad forward on mismatched completions before the batch's own (its KL term)."""
    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model, size=4)
    other = batch_for(model, size=4, seed=5)

    class KLFirst(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with torch.no_grad():
                model(**other)
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = KLFirst(
        model=model,
        args=_args(tmp_path, max_steps=1, learning_rate=0.0),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        callbacks=[RelativeFlatnessCallback(train_every=1)],
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "relative_flatness" in e)
    assert entry["relative_flatness"] == pytest.approx(_expected(model, batch), rel=1e-6)


@pytest.mark.parametrize("certificate_positions", [128, 4])
def test_beside_fam_trainer_it_logs_under_its_own_key_and_keeps_fams(certificate_positions, tmp_path, monkeypatch):
    """FAMTrainer logs relative_flatness (normalized here) and eval_relative_flatness; the callback (not normalized)
    adds relative_flatness_callback and eval_relative_flatness_callback instead of overwriting them. FAMTrainer's
    certificate reruns (on 2 of the 4 examples with 4 positions) are no evaluation batch of the callback's."""
    from fam_hf import FAMTrainer, FAMTrainingArguments

    monkeypatch.setattr("fam_hf.certificate_batch.CERTIFICATE_POSITIONS", certificate_positions)

    def run(callbacks):
        model = build("bert", "sequence", dtype=torch.float32)
        batch = batch_for(model, size=8)
        settings = {k: v for k, v in _args(tmp_path).to_dict().items() if k in ("use_cpu", "seed", "disable_tqdm")}
        args = FAMTrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            fam_lambda=0.5,
            fam_normalize=True,
            **settings,
        )
        trainer = FAMTrainer(
            model=model,
            args=args,
            train_dataset=as_dataset(batch),
            eval_dataset=as_dataset(batch),
            data_collator=collator(model.dtype),
            callbacks=callbacks,
        )
        trainer.train()
        return trainer, trainer.evaluate()

    alone, alone_metrics = run([])
    both, both_metrics = run([RelativeFlatnessCallback(train_every=1)])
    fam_logs = [e for e in alone.state.log_history if "loss" in e]
    logs = [e for e in both.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2]
    for fam_only, entry in zip(fam_logs, logs, strict=True):
        assert entry["relative_flatness"] == fam_only["relative_flatness"]
        assert entry["relative_flatness_callback"] > entry["relative_flatness"]
    assert both_metrics["eval_relative_flatness"] == alone_metrics["eval_relative_flatness"]
    width = both.model.classifier.in_features  # fam_normalize divides by it, the callback does not
    assert both_metrics["eval_relative_flatness_callback"] == pytest.approx(
        width * alone_metrics["eval_relative_flatness"], rel=1e-6
    )


def test_after_a_train_that_raised_inside_the_loss_the_next_run_is_measured_as_usual(tmp_path):
    model = build("llama", "causal_lm", dtype=torch.float32)
    batch = batch_for(model, size=8)
    calls = []

    def fails_once(outputs, labels, num_items_in_batch=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the loss failed")
        return _smoothed_or_own_loss("compute_loss_func")["compute_loss_func"](outputs, labels)

    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=8),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        compute_loss_func=fails_once,
        callbacks=[RelativeFlatnessCallback(train_every=1)],
    )
    with pytest.raises(RuntimeError, match="the loss failed"):
        trainer.train()
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "relative_flatness" in e)
    assert entry["relative_flatness"] == pytest.approx(_expected(copy.deepcopy(model), batch), rel=1e-6)

"""FAMTrainer: one SGD step equals the brute-force objective's, the plain Trainer when off, and scaling rules."""

import logging

import pytest
import torch
from tiny_models import (
    BERT_LIKE,
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
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from fam_hf import FAMTrainer, FAMTrainingArguments

MODELS = [
    ("bert", "sequence"),
    ("roberta", "sequence"),
    ("distilbert", "sequence"),
    ("vit", "sequence"),
    ("gpt2", "sequence"),
    ("llama", "causal_lm"),
    ("bert", "tokens"),
]


def _train_one_step(model, batch, tmp_path, trainer_cls=FAMTrainer, **args):
    before = snapshot(model)
    trainer = trainer_cls(
        model=model,
        args=sgd_args(tmp_path, batch_size=args.pop("batch_size", len(batch["labels"])), **args),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    )
    trainer.train()
    return updates(before, model), trainer


@pytest.mark.parametrize("model_type,task", MODELS, ids=[f"{m}-{t}" for m, t in MODELS])
def test_sgd_step_equals_gradient_of_task_loss_plus_brute_force_kappa(model_type, task, tmp_path):
    model = build(model_type, task)
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="full")
    without_penalty = expected_update(model, batch, fam_lambda=0.0)
    actual, _ = _train_one_step(model, batch, tmp_path, fam_lambda=2.0, fam_gradient="full")
    assert_updates_close(actual, expected)
    moved = max(float((expected[n] - without_penalty[n]).abs().max()) for n in expected)
    assert moved > 1e-4 * max(float(v.abs().max()) for v in expected.values()), "penalty too small to test"


@pytest.mark.parametrize("gradient", ["head", "weights"])
@pytest.mark.parametrize("model_type,task", [("bert", "sequence"), ("llama", "causal_lm")])
def test_sgd_step_in_each_gradient_mode(model_type, task, gradient, tmp_path):
    model = build(model_type, task)
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient=gradient)
    actual, _ = _train_one_step(model, batch, tmp_path, fam_lambda=2.0, fam_gradient=gradient)
    assert_updates_close(actual, expected)


def test_tied_head_gradient_reaches_the_shared_embedding(tmp_path):
    model = build("gpt2", "causal_lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="head")
    plain = expected_update(model, batch, fam_lambda=0.0)
    actual, _ = _train_one_step(model, batch, tmp_path, fam_lambda=2.0, fam_gradient="head")
    assert_updates_close(actual, expected)
    name = "transformer.wte.weight"
    assert float((actual[name] - plain[name]).abs().max()) > 1e-6


def test_lambda_zero_is_the_plain_trainer_bit_for_bit(tmp_path):
    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model, size=16)
    reference = build("bert", "sequence", dtype=torch.float32)
    common = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=3,
        disable_tqdm=True,
    )
    Trainer(
        model=reference,
        args=TrainingArguments(**common),
        train_dataset=as_dataset(batch),
        data_collator=collator(torch.float32),
    ).train()
    FAMTrainer(
        model=model,
        args=FAMTrainingArguments(**common, fam_lambda=0.0),
        train_dataset=as_dataset(batch),
        data_collator=collator(torch.float32),
    ).train()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_causal_lm_accumulation_gives_the_full_batch_update(tmp_path):
    batch = batch_for(build("llama", "causal_lm"))
    full, _ = _train_one_step(build("llama", "causal_lm"), batch, tmp_path, fam_lambda=2.0, fam_gradient="full")
    split, _ = _train_one_step(
        build("llama", "causal_lm"), batch, tmp_path, batch_size=4, accumulation=2, fam_lambda=2.0, fam_gradient="full"
    )
    assert_updates_close(split, full)


def test_classifier_that_ignores_num_items_scales_the_penalty_like_its_loss(tmp_path, caplog):
    """BERT's loss ignores num_items_in_batch, so the Trainer's update doubles with 2 accumulation steps."""
    batch = batch_for(build("bert", "sequence"))
    plain_full, _ = _train_one_step(build("bert", "sequence"), batch, tmp_path, fam_lambda=0.0)
    plain_split, _ = _train_one_step(
        build("bert", "sequence"), batch, tmp_path, batch_size=4, accumulation=2, fam_lambda=0.0
    )
    assert_updates_close({n: v / 2 for n, v in plain_split.items()}, plain_full)  # the Trainer's own behaviour
    fam_full, _ = _train_one_step(build("bert", "sequence"), batch, tmp_path, fam_lambda=2.0, fam_gradient="full")
    with caplog.at_level(logging.WARNING, logger="fam_hf.trainer"):
        fam_split, _ = _train_one_step(
            build("bert", "sequence"),
            batch,
            tmp_path,
            batch_size=4,
            accumulation=2,
            fam_lambda=2.0,
            fam_gradient="full",
        )
    assert_updates_close({n: v / 2 for n, v in fam_split.items()}, fam_full)
    assert "ignores num_items_in_batch" in caplog.text


def test_classifier_without_loss_kwargs_averages_accumulated_micro_batches(tmp_path):
    batch = batch_for(build("bert", "sequence"))
    full, _ = _train_one_step(build("bert", "sequence"), batch, tmp_path, fam_lambda=2.0, fam_gradient="full")
    model = build("bert", "sequence")
    model.accepts_loss_kwargs = False
    split, _ = _train_one_step(
        model, batch, tmp_path, batch_size=4, accumulation=2, fam_lambda=2.0, fam_gradient="full"
    )
    assert_updates_close(split, full)


def test_logs_split_loss_into_task_loss_and_penalty(tmp_path):
    model = build("bert", "sequence")
    _, trainer = _train_one_step(model, batch_for(model), tmp_path, fam_lambda=2.0)
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["fam_lambda"] == 2.0
    assert entry["relative_flatness"] > 0
    assert entry["loss"] == pytest.approx(entry["task_loss"] + 2.0 * entry["relative_flatness"], rel=1e-6)


def test_calibrated_lambda_makes_the_first_penalty_its_share_of_the_loss(tmp_path):
    model = build("bert", "sequence")
    _, trainer = _train_one_step(model, batch_for(model), tmp_path, fam_share=0.05)
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert trainer.fam_lambda == entry["fam_lambda"] > 0
    assert entry["fam_lambda"] * entry["relative_flatness"] == pytest.approx(0.05 * entry["task_loss"], rel=1e-6)


def test_evaluate_reports_relative_flatness_of_the_whole_dataset(tmp_path):
    from tiny_models import loss_rows

    from fam_hf.reference import hessian_relative_flatness

    model = build("gpt2", "sequence")
    batch = batch_for(model, size=6)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size=4, fam_lambda=1.0),
        eval_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    )
    metrics = trainer.evaluate()
    seen = {}
    handle = model.score.register_forward_hook(lambda m, a, o: seen.update(features=a[0], logits=o))
    model.eval()
    with torch.no_grad():
        model(**batch)
    handle.remove()
    features, labels = loss_rows(model, batch, seen["features"], seen["logits"])
    expected = hessian_relative_flatness(model.score.weight, features, labels)
    assert metrics["eval_relative_flatness"] == pytest.approx(float(expected), rel=1e-9)
    assert "eval_loss" in metrics


def test_non_finite_penalty_stops_training_and_names_the_step(tmp_path):
    model = build("bert", "sequence")
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="penalty is (nan|inf) at step 0"):
        _train_one_step(model, batch_for(model), tmp_path, fam_lambda=1.0)


def test_plain_training_arguments_are_refused_with_the_fix(tmp_path):
    model = build("bert", "sequence")
    with pytest.raises(ValueError, match="FAMTrainingArguments"):
        FAMTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"fam_lambda": -0.1}, "fam_lambda must be a finite number >= 0"),
        ({"fam_lambda": float("inf")}, "fam_lambda must be a finite number >= 0"),
        ({"fam_lambda": float("nan")}, "fam_lambda must be a finite number >= 0"),
        ({"fam_gradient": "all"}, "fam_gradient must be one of"),
        ({"fam_loss": "hinge"}, "fam_loss must be"),
        ({"fam_share": 0.0}, "fam_share must be > 0"),
        ({"fam_lambda": 0.1, "fam_share": 0.01}, "are both set, and a given fam_lambda ignores the share"),
    ],
)
def test_bad_settings_are_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        FAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)


def test_a_share_beside_fam_off_or_a_calibrated_lambda_is_accepted(tmp_path):
    off = FAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fam_lambda=0.0, fam_share=0.01)
    calibrated = FAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, fam_share=0.01)
    default = FAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert (off.resolved_fam_share, calibrated.resolved_fam_share, default.resolved_fam_share) == (0.01, 0.01, 0.001)


def test_data_parallel_over_several_gpus_is_refused_with_the_way_out(tmp_path):
    model = build("bert", "sequence")
    args = sgd_args(tmp_path, fam_lambda=0.1)
    args._n_gpu = 2  # what TrainingArguments reads off a machine with two visible GPUs and one process
    with pytest.raises(ValueError, match="DataParallel .*n_gpu=2.*DistributedDataParallel"):
        FAMTrainer(model=model, args=args, train_dataset=as_dataset(batch_for(model)))


def test_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(FAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--fam_lambda", "0.3", "--fam_gradient", "weights", "--fam_layer", "score", "--use_cpu"]
    )
    assert (args.fam_lambda, args.fam_gradient, args.fam_layer) == (0.3, "weights", "score")


def test_peft_lora_step_trains_the_saved_head_copy_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        build("bert", "sequence"), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    )
    batch = batch_for(model.get_base_model())
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="head")
    actual, trainer = _train_one_step(model, batch, tmp_path, fam_lambda=2.0, fam_gradient="head")
    assert trainer.fam_probe().head_name == "classifier"
    assert_updates_close(actual, expected)
    copy_name = next(n for n in actual if "modules_to_save.default.weight" in n)
    assert float(actual[copy_name].abs().max()) > 0


def test_bf16_autocast_trains_and_its_penalty_is_within_1e_2_of_float32(tmp_path):
    from fam_hf import FlatnessProbe

    model = build("bert", "sequence", dtype=torch.float32)
    batch = batch_for(model)
    probe = FlatnessProbe(model)
    values = {}
    for name, enabled in (("float32", False), ("bf16", True)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            with probe.watch(batch, batch["labels"], gradient=None) as seen:
                model(**batch)
        values[name] = float(seen[0].flatness.total / seen[0].flatness.rows)
    probe.remove()
    assert values["bf16"] == pytest.approx(values["float32"], rel=1e-2)
    assert values["bf16"] != values["float32"]  # autocast really ran in bf16
    _, trainer = _train_one_step(model, batch, tmp_path, batch_size=4, fam_lambda=1.0, bf16=True)
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert torch.isfinite(torch.tensor(entry["relative_flatness"])) and entry["relative_flatness"] > 0


def test_checkpoint_saves_and_resumes_with_the_fam_settings(tmp_path, caplog):
    import json

    model = build("bert", "sequence", dtype=torch.float32)
    data = as_dataset(batch_for(model, size=8))

    def args(**extra):
        return FAMTrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=2,
            save_steps=1,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            fam_share=0.01,
            fam_gradient="weights",
            **extra,
        )

    first = FAMTrainer(model=model, args=args(), train_dataset=data, data_collator=collator(torch.float32))
    first.train()
    saved = json.loads((tmp_path / "checkpoint-1" / "fam_config.json").read_text())
    assert saved["fam_gradient"] == "weights" and saved["fam_share"] == 0.01 and saved["head"] == "classifier"
    assert saved["resolved_fam_lambda"] == pytest.approx(first.fam_lambda)

    resumed = FAMTrainer(
        model=build("bert", "sequence", dtype=torch.float32),
        args=args(),
        train_dataset=data,
        data_collator=collator(torch.float32),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.fam_lambda == pytest.approx(first.fam_lambda)  # not re-calibrated on a later batch
    assert resumed.state.global_step == 2

    changed = FAMTrainer(
        model=build("bert", "sequence", dtype=torch.float32),
        args=args(fam_normalize=True),
        train_dataset=data,
        data_collator=collator(torch.float32),
    )
    with caplog.at_level(logging.WARNING, logger="fam_hf.trainer"):
        changed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "differ from the checkpoint" in caplog.text and "fam_normalize" in caplog.text


def test_torch_compile_trains_with_the_exact_penalty(tmp_path):
    """Dynamo traces the model with the head's hook (a graph break); the eager backend keeps the test fast."""
    model = build("bert", "sequence")
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="head")
    actual, _ = _train_one_step(
        model, batch, tmp_path, fam_lambda=2.0, torch_compile=True, torch_compile_backend="eager"
    )
    assert_updates_close(actual, expected)


def test_softcapped_logits_get_the_exact_hessian_through_the_cap(tmp_path):
    """Gemma-2 caps its logits after the head; the penalty is that of the loss on the capped logits."""
    import torch.nn.functional as F

    model = build("gemma2", "causal_lm")
    cap = model.config.final_logit_softcapping
    batch = batch_for(model)
    capped_ce = lambda z, y: F.cross_entropy(cap * torch.tanh(z / cap), y)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="full", loss=capped_ce)
    uncapped = expected_update(model, batch, fam_lambda=2.0, gradient="full")
    actual, _ = _train_one_step(model, batch, tmp_path, fam_lambda=2.0, fam_gradient="full")
    assert_updates_close(actual, expected, rtol=1e-6)  # Gemma-2's RMSNorm runs in float32 even in a float64 model
    assert max(float((expected[n] - uncapped[n]).abs().max()) for n in expected) > 1e-3  # the cap matters here


def test_logits_to_keep_uses_the_kept_positions(tmp_path):
    model = build("llama", "causal_lm")
    batch = batch_for(model)
    batch["labels"] = batch["labels"][:, -3:]
    expected = expected_update(model, {**batch, "logits_to_keep": 3}, fam_lambda=2.0, gradient="full")
    before = snapshot(model)
    base_collate = collator(model.dtype)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=2.0, fam_gradient="full"),
        train_dataset=as_dataset(batch),
        data_collator=lambda ex: {**base_collate(ex), "logits_to_keep": 3},
    )
    trainer.train()
    assert_updates_close(updates(before, model), expected)


def test_labels_for_positions_the_head_did_not_produce_are_refused(tmp_path):
    model = build("llama", "causal_lm")
    batch = batch_for(model)
    base_collate = collator(model.dtype)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=2.0),
        train_dataset=as_dataset(batch),
        data_collator=lambda ex: {**base_collate(ex), "logits_to_keep": 3},
    )
    # the model's own loss fails first (the certificate reruns it before any update); a probe that read these rows
    # without that rerun names logits_to_keep
    with pytest.raises(ValueError, match="logits_to_keep|Expected input batch_size"):
        trainer.train()


def test_fsdp1_is_refused_with_fsdp2_named_as_the_way():
    from types import SimpleNamespace

    from fam_hf.trainer import check_sharding

    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match="FSDP2.*version': 2"):
        check_sharding(fsdp1)
    check_sharding(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))))
    check_sharding(SimpleNamespace(state=SimpleNamespace()))


def test_max_rows_at_least_the_batch_is_exact_and_smaller_estimates(tmp_path):
    model = build("llama", "causal_lm")
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="head")
    exact, _ = _train_one_step(model, batch, tmp_path, fam_lambda=2.0, fam_max_rows=1000)
    assert_updates_close(exact, expected)
    sampled, trainer = _train_one_step(build("llama", "causal_lm"), batch, tmp_path, fam_lambda=2.0, fam_max_rows=5)
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["relative_flatness"] > 0
    assert not all(torch.allclose(sampled[n], expected[n]) for n in expected)


def _fam_part(fam, plain):
    """The penalty's part of an update: the FAM update minus the plain one from the same model and batch."""
    return {n: fam[n] - plain[n] for n in fam}


@pytest.mark.parametrize(
    "loss_setting",
    [
        {"label_smoothing_factor": 0.1},
        {
            "compute_loss_func": lambda outputs, labels, num_items_in_batch=None: (
                _summed_lm_loss(outputs, labels) / num_items_in_batch
            )
        },
    ],
    ids=["label_smoother", "compute_loss_func"],
)
def test_trainer_loss_paths_scale_the_penalty_like_the_task_loss_under_accumulation(loss_setting, tmp_path):
    """A label smoother or compute_loss_func divides by num_items_in_batch: GA=2 halves give the full batch's update,
    for the task loss (the Trainer's own behaviour) and for the penalty."""
    batch = batch_for(build("llama", "causal_lm"))
    loss_setting = dict(loss_setting)
    loss_func = loss_setting.pop("compute_loss_func", None)

    def step(fam_lambda, **split):
        model = build("llama", "causal_lm")
        before = snapshot(model)
        trainer = FAMTrainer(
            model=model,
            args=sgd_args(
                tmp_path,
                batch_size=split.get("batch_size", 8),
                accumulation=split.get("accumulation", 1),
                fam_lambda=fam_lambda,
                fam_gradient="full",
                **loss_setting,
            ),
            train_dataset=as_dataset(batch),
            data_collator=collator(model.dtype),
            compute_loss_func=loss_func,
        )
        trainer.train()
        return updates(before, model)

    halves = dict(batch_size=4, accumulation=2)
    plain_full, plain_split = step(0.0), step(0.0, **halves)
    assert_updates_close(plain_split, plain_full, rtol=1e-6)  # the Trainer's own rule for this loss path
    penalty_full, penalty_split = _fam_part(step(2.0), plain_full), _fam_part(step(2.0, **halves), plain_split)
    assert max(float(v.abs().max()) for v in penalty_full.values()) > 1e-3
    assert_updates_close(penalty_split, penalty_full, rtol=1e-6)


def _summed_lm_loss(outputs, labels):
    logits = outputs["logits"][:, :-1].reshape(-1, outputs["logits"].shape[-1])
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:].reshape(-1), reduction="sum")


class _SequentialFAMTrainer(FAMTrainer):
    """Micro-batches in dataset order, so a test knows which examples each one holds."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_a_per_micro_batch_mean_loss_func_gets_the_penalty_in_its_own_units(tmp_path):
    """A compute_loss_func that ignores num_items_in_batch returns each micro-batch's mean; the Trainer then adds
    the micro-batches' means (it counts the loss as already scaled). The penalty must follow: each micro-batch adds
    its own kappa, the brute force of the update being the sum of the micro-batches' own updates."""
    model = build("llama", "causal_lm")
    batch = batch_for(model)

    def mean_loss(outputs, labels, num_items_in_batch=None):
        return _summed_lm_loss(outputs, labels) / (labels[:, 1:] != -100).sum()

    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    parts = [expected_update(model, half, fam_lambda=2.0, gradient="full") for half in halves]
    expected = {n: parts[0][n] + parts[1][n] for n in parts[0]}
    before = snapshot(model)
    trainer = _SequentialFAMTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size=4, accumulation=2, fam_lambda=2.0, fam_gradient="full"),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        compute_loss_func=mean_loss,
    )
    trainer.train()
    assert_updates_close(updates(before, model), expected, rtol=1e-6)


def test_fp16_scaler_skips_a_step_whose_loss_overflowed_but_refuses_a_penalty_that_alone_overflows(tmp_path):
    model = build("bert", "sequence")
    args = sgd_args(tmp_path, fam_lambda=1.0)
    trainer = FAMTrainer(model=model, args=args, train_dataset=as_dataset(batch_for(model)))
    inf, finite = torch.tensor(float("inf")), torch.tensor(1.0)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 training sets up
    trainer._fam_check_finite(inf, inf)  # the scaler skips this step, as it would in plain training
    with pytest.raises(ValueError, match="penalty is inf"):
        trainer._fam_check_finite(inf, finite)  # plain training would have taken this step
    trainer.accelerator.scaler = None
    with pytest.raises(ValueError, match="penalty is inf"):
        trainer._fam_check_finite(inf, inf)  # no scaler: nothing would skip it


def _resumable(tmp_path, model, **extra) -> FAMTrainer:
    """A BERT classifier over 8 examples: 2 steps of 4, a checkpoint after each, logs every step."""
    args = FAMTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        fam_share=0.05,
        fam_max_rows=None,
        **extra,
    )
    data = as_dataset(batch_for(build("bert", "sequence"), size=8))
    return FAMTrainer(model=model, args=args, train_dataset=data, data_collator=collator(torch.float64))


@pytest.mark.parametrize(
    "change,recalibrates",
    [({"fam_normalize": True}, True), ({"fam_loss": "cross_entropy"}, True), ({"fam_gradient": "head"}, False)],
    ids=["fam_normalize", "fam_loss", "fam_gradient"],
)
def test_resume_with_a_setting_that_rescales_kappa_recalibrates_the_lambda(change, recalibrates, tmp_path, caplog):
    """A calibrated lambda was resolved for the old kappa's scale: fam_normalize, fam_layer and fam_loss change that
    scale (recalibrated on the first resumed batch); fam_gradient changes only the penalty's gradient (kept)."""
    first = _resumable(tmp_path, build("bert", "sequence"))
    first.train()
    resumed = _resumable(tmp_path, build("bert", "sequence"), **change)
    with caplog.at_level(logging.INFO, logger="fam_hf.trainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    entry = next(e for e in resumed.state.log_history if e["step"] == 2 and "loss" in e)
    (setting,) = change
    if recalibrates:
        assert entry["fam_lambda"] * entry["relative_flatness"] == pytest.approx(0.05 * entry["task_loss"], rel=1e-6)
        assert any("recalibrat" in r.getMessage() and setting in r.getMessage() for r in caplog.records)
    else:
        assert entry["fam_lambda"] == resumed.fam_lambda == first.fam_lambda


class RaiseOnFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("a callback failed on step 1")


@pytest.mark.parametrize("loss_setting", ["compute_loss_func", "label_smoother"])
def test_a_train_that_raises_removes_its_wrappers_and_hooks(loss_setting, tmp_path):
    def mean_loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs["logits"], labels)

    model = build("bert", "sequence")
    loss = {"compute_loss_func": mean_loss} if loss_setting == "compute_loss_func" else {}
    smoothing = {"label_smoothing_factor": 0.1} if loss_setting == "label_smoother" else {}
    failing = RaiseOnFirstStep()
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=1.0, **smoothing),
        train_dataset=as_dataset(batch_for(model)),
        data_collator=collator(model.dtype),
        callbacks=[failing],
        **loss,
    )
    original = getattr(trainer, loss_setting)
    assert original is not None
    with pytest.raises(RuntimeError, match="a callback failed"):
        trainer.train()
    assert getattr(trainer, loss_setting) is original
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert len(model.classifier._forward_hooks) == 1 and not model.classifier._forward_pre_hooks  # the probe's
    trainer.remove_callback(failing)
    trainer.train()
    assert next(e for e in trainer.state.log_history if "loss" in e)["relative_flatness"] > 0


def _dropout_bert():
    config = AutoConfig.for_model(
        "bert", **BERT_LIKE, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_labels=3
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def _batch_norm_resnet():
    config = AutoConfig.for_model(
        "resnet", embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_channels=1, num_labels=3
    )
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(config)


@pytest.mark.parametrize("make", [_dropout_bert, _batch_norm_resnet], ids=["dropout", "batch_norm"])
def test_the_certificates_reruns_leave_no_trace_lambda_zero_is_plain_bit_for_bit(make, tmp_path):
    """The certificate reruns the forward pass on the first batch: its dropout draws and batch-norm statistics must
    not reach the run, so parameters and buffers end exactly as the plain Trainer's."""
    runs = {}
    for name, trainer_class, args_class, fam in (
        ("plain", Trainer, TrainingArguments, {}),
        ("fam", FAMTrainer, FAMTrainingArguments, {"fam_lambda": 0.0}),
    ):
        model = make()
        if model.config.model_type == "resnet":
            generator = torch.Generator().manual_seed(1)
            batch = {"pixel_values": torch.randn(8, 1, 16, 16, generator=generator), "labels": torch.arange(8) % 3}
        else:
            batch = batch_for(model, size=8)
        trainer_class(
            model=model,
            args=args_class(
                output_dir=str(tmp_path / name),
                per_device_train_batch_size=4,
                max_steps=3,
                use_cpu=True,
                report_to=[],
                save_strategy="no",
                seed=3,
                disable_tqdm=True,
                **fam,
            ),
            train_dataset=as_dataset(batch),
            data_collator=collator(torch.float32),
        ).train()
        runs[name] = model.state_dict()
    assert runs["plain"].keys() == runs["fam"].keys()
    for key, value in runs["plain"].items():
        assert torch.equal(value, runs["fam"][key]), key

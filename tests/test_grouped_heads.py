"""Question answering and multiple choice: a softmax over each example's positions or choices, not over the head's
outputs. The probe's kappa, its gradients in every mode and its task loss against the models' own losses."""

import functools

import pytest
import torch
import torch.nn.functional as F
from tiny_models import BERT_LIKE, NO_DROPOUT
from torch import nn
from transformers import AutoConfig, AutoModelForMultipleChoice, AutoModelForQuestionAnswering, BertForPreTraining
from transformers.loss.loss_utils import ForQuestionAnsweringLoss

from fam_hf import FlatnessProbe, measure_relative_flatness
from fam_hf.flatness import grouped_flatness_sum
from fam_hf.reference import hessian_relative_flatness, model_hessian_relative_flatness
from fam_hf.rows import MULTIPLE_CHOICE, QUESTION_ANSWERING, HeadTask, UnsupportedTaskError

BATCH, SEQ, CHOICES = 5, 6, 3
VOCAB = BERT_LIKE["vocab_size"]


def _model(task: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", **BERT_LIKE, **NO_DROPOUT)
    config.initializer_range = 0.3  # logits spread enough that the softmax is far from uniform
    auto = {"qa": AutoModelForQuestionAnswering, "mc": AutoModelForMultipleChoice}[task]
    return auto.from_config(config).to(dtype).eval()


def _batch(task: str, seed: int = 1, ignored: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if task == "qa":
        # 9 and 11 are past the sequence: clamped to SEQ and ignored by the loss; -2 is clamped to 0 and counts
        start = torch.tensor([1, 3, 9, 0, 5]) if ignored else torch.tensor([1, 3, 2, 0, 5])
        end = torch.tensor([2, 5, 4, 11, -2]) if ignored else torch.tensor([2, 5, 4, 1, 5])
        input_ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=generator)
        return {"input_ids": input_ids, "start_positions": start, "end_positions": end}
    input_ids = torch.randint(2, VOCAB, (BATCH, CHOICES, SEQ), generator=generator)
    labels = torch.randint(0, CHOICES, (BATCH,), generator=generator)
    if ignored:
        labels[2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _loss_of_logits(task: str, batch: dict[str, torch.Tensor]):
    """The model's own loss as a function of the head's flattened logits (brute force for the gradients)."""
    if task == "qa":

        def qa_loss(z, _):
            start_logits, end_logits = z.reshape(BATCH, SEQ, 2).unbind(-1)
            return ForQuestionAnsweringLoss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])

        return qa_loss
    return lambda z, _: F.cross_entropy(z.reshape(-1, CHOICES), batch["labels"])


def _run(model, batch, gradient=None, with_task=False, **probe_options):
    """Run the model under a probe; return (result, model output, head features, head)."""
    probe = FlatnessProbe(model, **probe_options)
    seen = {}
    handle = probe.head.register_forward_hook(lambda m, args, out: seen.update(features=args[0]))
    with torch.set_grad_enabled(gradient is not None):
        with probe.watch(batch, batch.get("labels"), gradient=gradient, with_task=with_task) as results:
            output = model(**batch)
    handle.remove()
    probe.remove()
    return results[0], output, seen["features"], probe.head


def _assert_rel(actual, expected, tol=1e-8):
    actual, expected = actual.detach(), expected.detach()
    scale = max(float(expected.abs().max()), 1e-12)
    assert float((actual - expected).abs().max()) <= tol * scale, (actual, expected)


@pytest.mark.parametrize("task", ["qa", "mc"])
@pytest.mark.parametrize("ignored", [True, False], ids=["with_ignored_targets", "all_counted"])
def test_kappa_equals_the_hessian_of_the_models_own_loss(task, ignored):
    model, batch = _model(task), _batch(task, ignored=ignored)
    result, output, _, _ = _run(model, batch)
    expected = model_hessian_relative_flatness(model, batch)
    assert result.kind == {"qa": QUESTION_ANSWERING, "mc": MULTIPLE_CHOICE}[task]
    assert float(expected) > 0
    _assert_rel(result.flatness.total / result.flatness.rows, expected)


def test_question_answering_is_not_a_two_class_softmax_per_token():
    """The reading the probe used to take (a 2-class softmax over every token) gives another number."""
    model, batch = _model("qa"), _batch("qa")
    result, _, features, head = _run(model, batch)
    logits = head(features).detach()
    per_token = hessian_relative_flatness(head.weight.detach(), features.detach(), torch.zeros(BATCH * SEQ).long())
    assert logits.shape == (BATCH, SEQ, 2)
    kappa = float(result.flatness.total / result.flatness.rows)
    assert abs(kappa - float(per_token)) > 0.1 * kappa


@pytest.mark.parametrize("task", ["qa", "mc"])
@pytest.mark.parametrize("gradient", ["full", "head", "weights"])
def test_each_gradient_mode_matches_autograd_of_the_brute_force(task, gradient):
    model, batch = _model(task), _batch(task)
    result, _, features, head = _run(model, batch, gradient=gradient)
    penalty = result.flatness.total / result.flatness.rows
    inputs = (head.weight, head.bias, features)
    actual = torch.autograd.grad(penalty, inputs, allow_unused=True)
    actual = [torch.zeros_like(x) if g is None else g for g, x in zip(actual, inputs)]

    held = features if gradient == "full" else features.detach()
    brute = hessian_relative_flatness(
        head.weight, held, None, head.bias, loss=_loss_of_logits(task, batch), hold_traces=gradient == "weights"
    )
    _assert_rel(brute, model_hessian_relative_flatness(model, batch), tol=1e-10)  # the brute force is the model's
    expected = torch.autograd.grad(brute, inputs, allow_unused=True)
    expected = [torch.zeros_like(x) if g is None else g for g, x in zip(expected, inputs)]
    scale = max(float(g.abs().max()) for g in expected)
    assert scale > 0 and float(expected[0].abs().max()) > 0
    for name, got, want in zip(("weight", "bias", "features"), actual, expected):
        assert float((got - want).abs().max()) <= 1e-8 * scale, (name, got, want)
    if gradient == "full":
        assert float(expected[2].abs().max()) > 0
    else:
        assert float(actual[2].abs().max()) == 0.0


@pytest.mark.parametrize("task", ["qa", "mc"])
@pytest.mark.parametrize("ignored", [True, False], ids=["with_ignored_targets", "all_counted"])
def test_task_loss_over_rows_is_the_models_loss(task, ignored):
    model, batch = _model(task), _batch(task, ignored=ignored)
    result, output, _, _ = _run(model, batch, with_task=True)
    rows = {"qa": BATCH, "mc": BATCH - 1 if ignored else BATCH}[task]
    assert float(result.flatness.rows) == rows
    torch.testing.assert_close(result.task_loss / result.flatness.rows, output.loss, rtol=1e-14, atol=0)


def test_correct_counts_exact_spans_and_right_choices():
    model, batch = _model("qa"), _batch("qa", ignored=False)
    with torch.no_grad():
        output = model(**{k: v for k, v in batch.items() if k == "input_ids"})
    batch["start_positions"] = output.start_logits.argmax(-1)
    batch["end_positions"] = output.end_logits.argmax(-1)
    batch["end_positions"][0] = (batch["end_positions"][0] + 1) % SEQ  # one wrong end
    batch["start_positions"][1] = SEQ + 3  # one ignored start: not an exact match
    result, _, _, _ = _run(model, batch, with_task=True)
    assert int(result.correct) == BATCH - 2

    model, batch = _model("mc"), _batch("mc")
    with torch.no_grad():
        choice = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    batch["labels"] = torch.where(batch["labels"] == -100, -100, choice)
    batch["labels"][0] = (choice[0] + 1) % CHOICES
    result, _, _, _ = _run(model, batch, with_task=True)
    assert int(result.correct) == BATCH - 2  # one wrong, one ignored


def test_without_targets_every_example_counts_and_there_is_no_task_loss():
    model, batch = _model("qa"), _batch("qa", ignored=False)
    unlabelled = {"input_ids": batch["input_ids"]}
    result, output, _, _ = _run(model, unlabelled, with_task=True)
    assert output.loss is None and result.task_loss is None
    assert float(result.flatness.rows) == BATCH
    labelled, _, _, _ = _run(model, batch)
    _assert_rel(result.flatness.total, labelled.flatness.total, tol=1e-12)  # nothing ignored in either


def test_measure_relative_flatness_reads_the_positions_from_the_batch():
    model, batch = _model("qa"), _batch("qa")
    report = measure_relative_flatness(model, [batch, _batch("qa", seed=2)], progress=False)
    first, output, _, _ = _run(model, batch, with_task=True)
    second, output2, _, _ = _run(model, _batch("qa", seed=2), with_task=True)
    assert report.rows == 2 * BATCH and report.head == "qa_outputs"
    assert report.loss == pytest.approx(float(output.loss + output2.loss) / 2, rel=1e-12)
    kappa = float(first.flatness.total + second.flatness.total) / (2 * BATCH)
    assert report.relative_flatness == pytest.approx(kappa, rel=1e-12)


@pytest.mark.parametrize("gradient", ["full", "head", "weights"])
def test_chunks_of_groups_give_the_same_value_and_gradients(gradient, monkeypatch):
    from fam_hf import flatness

    generator = torch.Generator().manual_seed(4)
    f64 = dict(dtype=torch.float64, generator=generator)
    weight, bias = torch.randn(2, 5, **f64).requires_grad_(), torch.randn(2, **f64).requires_grad_()
    features = torch.randn(7, 4, 5, **f64).requires_grad_()
    loss_weights = torch.rand(7, 2, **f64)
    inputs = (weight, bias, features)

    def value_and_grads():
        total = grouped_flatness_sum(gradient, weight, bias, features, features @ weight.T + bias, loss_weights, 3.0)
        grads = torch.autograd.grad(total.total, inputs, allow_unused=True)
        return total.total, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]

    whole, whole_grads = value_and_grads()
    monkeypatch.setattr(flatness, "CHUNK_ELEMENTS", 2 * 4 * 5)  # two groups a chunk, the last one short
    chunked, chunked_grads = value_and_grads()
    _assert_rel(chunked, whole, tol=1e-12)
    scale = max(float(g.abs().max()) for g in whole_grads)  # the bias's gradient is zero up to rounding
    assert scale > 0
    for actual, expected in zip(chunked_grads, whole_grads):
        assert float((actual - expected).abs().max()) <= 1e-12 * scale


def test_confident_predictions_stay_accurate_in_float32():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 8, dtype=torch.float64, generator=generator)
    features = torch.randn(6, 10, 8, dtype=torch.float64, generator=generator) + 10.0  # ||phi||^2 near 800
    logits = torch.randn(6, 10, 2, dtype=torch.float64, generator=generator)
    logits[:, 3] += 15.0  # position 3 holds all but ~1e-5 of each softmax: the variance is ~1e-5 of ||phi||^2
    loss_weights = torch.full((6, 2), 1 / 12, dtype=torch.float64)
    exact = grouped_flatness_sum(None, weight, None, features, logits, loss_weights, 6).total
    single = grouped_flatness_sum(None, weight.float(), None, features.float(), logits.float(), loss_weights, 6).total
    assert float(exact) > 0
    assert abs(float(single) - float(exact)) <= 1e-4 * float(exact)


def test_bf16_autocast_is_reduced_in_float32_within_1e_2():
    model, batch = _model("qa", dtype=torch.float32), _batch("qa")
    plain, _, _, _ = _run(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _, _, _ = _run(model, batch)
    assert half.flatness.total.dtype == torch.float32
    kappa = float(plain.flatness.total / plain.flatness.rows)
    assert float(half.flatness.total / half.flatness.rows) == pytest.approx(kappa, rel=1e-2)


def test_an_unknown_model_is_refused_and_names_the_settings():
    pretraining = BertForPreTraining(AutoConfig.for_model("bert", **BERT_LIKE))  # MLM + next-sentence loss
    with pytest.raises(UnsupportedTaskError, match=r"BertForPreTraining.*fam_layer.*fam_loss"):
        FlatnessProbe(pretraining)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(UnsupportedTaskError, match=r"cannot tell which loss Sequential.*fam_loss"):
        FlatnessProbe(plain, head="2")
    named = FlatnessProbe(plain, head="2", loss="cross_entropy")  # a named loss is taken per row of the output
    assert named.task.kind == "tokens" and named.task.loss == "cross_entropy"


def test_a_loss_fam_hf_does_not_reproduce_is_refused():
    model = _model("qa")
    model.loss_type = "ForCTC"  # what the model's loss_function computes wins over the class's auto mapping
    with pytest.raises(UnsupportedTaskError, match=r"loss_type is 'ForCTC'.*fam_loss"):
        HeadTask.from_model(model)


def test_a_per_row_loss_for_question_answering_is_refused():
    with pytest.raises(UnsupportedTaskError, match=r"fam_loss='mse'.*softmax cross-entropy over positions"):
        FlatnessProbe(_model("qa"), loss="mse")
    assert FlatnessProbe(_model("qa"), loss="cross_entropy").task.kind == QUESTION_ANSWERING


@pytest.mark.parametrize("task,layer", [("qa", "bert.encoder.layer.0.output.dense"), ("mc", "bert.pooler.dense")])
def test_a_named_layer_that_does_not_produce_the_grouped_logits_is_refused(task, layer):
    model, batch = _model(task), _batch(task)
    with pytest.raises(ValueError, match="Set fam_layer to the layer that produces"):
        _run(model, batch, head=layer)


@pytest.mark.parametrize("task", ["qa", "mc"])
def test_fam_trainer_step_is_the_gradient_of_the_models_loss_plus_the_exact_penalty(task, tmp_path):
    """One SGD step of FAMTrainer on a QA or multiple-choice model: -lr * grad(model loss + lambda * brute kappa)."""
    from tiny_models import as_dataset, assert_updates_close, collator, sgd_args, snapshot, updates

    from fam_hf import FAMTrainer

    batch, lr, fam_lambda = _batch(task), 0.5, 2.0
    reference = _model(task).train()
    seen = {}
    head = reference.qa_outputs if task == "qa" else reference.classifier
    handle = head.register_forward_hook(lambda m, args, out: seen.update(features=args[0]))
    task_loss = reference(**batch).loss
    handle.remove()
    kappa = hessian_relative_flatness(head.weight, seen["features"], None, head.bias, loss=_loss_of_logits(task, batch))
    params = list(reference.parameters())
    (plain_head,) = torch.autograd.grad(task_loss, [head.weight], retain_graph=True)
    grads = torch.autograd.grad(task_loss + fam_lambda * kappa, params, allow_unused=True)
    names = [n for n, _ in reference.named_parameters()]
    expected = {n: -lr * (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads)}

    model = _model(task)
    before = snapshot(model)
    FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size=BATCH, fam_lambda=fam_lambda, fam_gradient="full"),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    ).train()
    actual = updates(before, model)
    assert_updates_close(actual, expected)
    head_name = next(n for n, p in reference.named_parameters() if p is head.weight)
    assert float((expected[head_name] + lr * plain_head).abs().max()) > 1e-3  # the penalty moves the head


def test_a_question_answering_loss_fam_hf_cannot_compute_is_refused_with_what_was_compared(tmp_path):
    """A z-loss on the start and end logits: the refusal compares curvatures; its start and end positions are the
    labels the batch has (not "no labels", nor "several label inputs")."""
    from tiny_models import as_dataset, collator, sgd_args

    from fam_hf import FAMTrainer
    from fam_hf.certificate import LossMismatchError

    model, batch = _model("qa").train(), _batch("qa")
    forward = model.forward

    @functools.wraps(forward)  # the Trainer keeps the batch's columns by the forward's signature
    def with_z_loss(*args, **kwargs):
        output = forward(*args, **kwargs)
        if output.loss is not None:
            output.loss = output.loss + 0.1 * (output.start_logits.logsumexp(-1) ** 2).mean()
        return output

    model.forward = with_z_loss
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size=BATCH, fam_lambda=1.0),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    )
    with pytest.raises(LossMismatchError, match="matches none of the forms") as refusal:
        trainer.train()
    assert "label" not in str(refusal.value).split("matches none of the forms")[0]

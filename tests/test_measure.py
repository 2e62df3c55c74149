"""measure_relative_flatness over a dataset equals the brute force over all its rows."""

import pytest
import torch
from tiny_models import as_dataset, batch_for, build, collator, loss_rows

from fam_hf import measure_relative_flatness
from fam_hf.reference import hessian_relative_flatness


def _brute_force(model, batch):
    seen = {}
    handle = model.classifier.register_forward_hook(lambda m, a, o: seen.update(features=a[0], logits=o))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    handle.remove()
    features, labels = loss_rows(model, batch, seen["features"], seen["logits"])
    kappa = hessian_relative_flatness(
        model.classifier.weight.detach(), features, labels, model.classifier.bias.detach()
    )
    accuracy = float((out.logits.argmax(-1) == batch["labels"]).double().mean())
    return float(kappa), float(out.loss), accuracy


def test_dataset_measure_equals_brute_force_over_all_rows():
    model = build("bert", "sequence")
    batch = batch_for(model, size=10)
    report = measure_relative_flatness(
        model, as_dataset(batch), batch_size=4, collate_fn=collator(model.dtype), progress=False
    )
    kappa, loss, accuracy = _brute_force(model, batch)
    assert report.relative_flatness == pytest.approx(kappa, rel=1e-9)
    assert report.loss == pytest.approx(loss, rel=1e-9)
    assert report.accuracy == pytest.approx(accuracy)
    assert (report.rows, report.head) == (10, "classifier")


def test_measure_is_invariant_to_rescaling_the_head_against_its_features():
    """Scale the final layer norm by 1/a and the head by a: same logits, same relative flatness."""
    model = build("vit", "sequence")
    batch = batch_for(model, size=6)
    before = measure_relative_flatness(model, [batch], progress=False)
    with torch.no_grad():
        model.vit.layernorm.weight /= 5.0
        model.vit.layernorm.bias /= 5.0
        model.classifier.weight *= 5.0
    after = measure_relative_flatness(model, [batch], progress=False)
    assert after.loss == pytest.approx(before.loss, rel=1e-9)
    assert after.relative_flatness == pytest.approx(before.relative_flatness, rel=1e-9)


def test_measure_leaves_the_model_mode_and_hooks_as_they_were():
    model = build("bert", "sequence")
    model.train()
    measure_relative_flatness(model, [batch_for(model)], progress=False)
    assert model.training
    assert not model.classifier._forward_hooks

"""relative_flatness against the brute-force Hessian, in values and gradients, for every loss and mode."""

import pytest
import torch
import torch.nn.functional as F

from fam_hf import inputs_for_gradient, relative_flatness
from fam_hf.reference import hessian_relative_flatness

ROWS, DIM, WIDTH = 7, 5, 4


def _grads(value, inputs):
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _assert_rel(actual, expected, tol=1e-8):
    actual, expected = actual.detach(), expected.detach()
    scale = max(float(expected.abs().max()), 1e-12)
    assert float((actual - expected).abs().max()) <= tol * scale, (actual, expected)


def _problem(loss, seed=0, leading=(ROWS,)):
    generator = torch.Generator().manual_seed(seed)
    f64 = dict(generator=generator, dtype=torch.float64)
    weight = torch.randn(WIDTH, DIM, **f64).requires_grad_()
    bias = torch.randn(WIDTH, **f64).requires_grad_()
    features = torch.randn(*leading, DIM, **f64).requires_grad_()
    if loss == "cross_entropy":
        labels = torch.randint(0, WIDTH, leading, generator=generator)
        labels.view(-1)[1] = -100
    else:
        labels = torch.rand(*leading, WIDTH, **f64)
    return weight, bias, features, labels


CALLABLES = {
    "cross_entropy": lambda z, y: F.cross_entropy(z, y),
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
}


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("as_callable", [False, True], ids=["closed_form", "logit_autograd"])
def test_value_and_gradient_match_brute_force_hessian(loss, as_callable):
    weight, bias, features, labels = _problem(loss)
    brute = hessian_relative_flatness(weight, features, labels, bias, loss=loss)
    expected_grads = _grads(brute, (weight, bias, features))
    logits = features @ weight.T + bias
    kappa = relative_flatness(weight, features, logits, labels, loss=CALLABLES[loss] if as_callable else loss)
    _assert_rel(kappa, brute)
    for actual, expected in zip(_grads(kappa, (weight, bias, features)), expected_grads):
        _assert_rel(actual, expected)


def test_leading_dimensions_are_flattened_into_rows():
    weight, bias, features, labels = _problem("cross_entropy", leading=(2, 3))
    logits = features @ weight.T + bias
    flat = relative_flatness(weight, features.reshape(6, DIM), logits.reshape(6, WIDTH), labels.reshape(6))
    _assert_rel(relative_flatness(weight, features, logits, labels), flat, tol=1e-14)


def test_soft_targets_and_label_smoothing_share_the_hard_label_hessian():
    weight, bias, features, labels = _problem("cross_entropy")
    labels[1] = 0
    logits = features @ weight.T + bias
    soft = F.one_hot(labels, WIDTH).double() * 0.9 + 0.1 / WIDTH
    smoothed = hessian_relative_flatness(weight, features, soft, bias, loss="cross_entropy")
    _assert_rel(relative_flatness(weight, features, logits, soft), smoothed)
    _assert_rel(relative_flatness(weight, features, logits, labels), smoothed)


def test_ignored_rows_do_not_count():
    weight, bias, features, labels = _problem("cross_entropy")
    logits = features @ weight.T + bias
    keep = labels != -100
    kept = relative_flatness(weight, features[keep], logits[keep], labels[keep])
    _assert_rel(relative_flatness(weight, features, logits, labels), kept, tol=1e-14)
    assert relative_flatness(weight, features, logits, torch.full_like(labels, -100)) == 0


def test_normalize_divides_by_input_width():
    weight, bias, features, labels = _problem("cross_entropy")
    logits = features @ weight.T + bias
    plain = relative_flatness(weight, features, logits, labels)
    _assert_rel(relative_flatness(weight, features, logits, labels, normalize=True), plain / DIM, tol=1e-14)


@pytest.mark.parametrize("scale", [0.1, 7.0])
def test_invariant_to_rescaling_head_against_features(scale):
    weight, bias, features, labels = _problem("cross_entropy")
    logits = features @ weight.T + bias
    kappa = relative_flatness(weight, features, logits, labels)
    rescaled = relative_flatness(weight * scale, features / scale, logits, labels)
    _assert_rel(rescaled, kappa, tol=1e-12)

    # the plain Hessian trace, which ignores the weights, is not invariant: the setting is a real test
    def hessian_trace(w, phi):
        hessian = torch.func.hessian(lambda w_: F.cross_entropy(phi @ w_.T + bias, labels))(w.detach())
        return float(torch.einsum("sdsd->", hessian))

    plain, moved = hessian_trace(weight, features), hessian_trace(weight * scale, features / scale)
    assert abs(moved - plain) > 0.5 * min(abs(moved), abs(plain))


def test_confident_predictions_stay_accurate_in_float32():
    weight, bias, features, labels = _problem("cross_entropy")
    logits64 = (features @ weight.T + bias).detach() * 12  # p_top within ~1e-9 of one for most rows
    exact = relative_flatness(weight.detach(), features.detach(), logits64, labels)
    single = relative_flatness(weight.detach().float(), features.detach().float(), logits64.float(), labels)
    assert float(exact) > 0
    assert abs(float(single) - float(exact)) <= 1e-4 * float(exact)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_head_mode_is_exact_for_head_parameters_and_stops_at_features(loss):
    weight, bias, features, labels = _problem(loss)
    brute = hessian_relative_flatness(weight, features.detach(), labels, bias, loss=loss)
    expected = _grads(brute, (weight, bias))
    logits = features @ weight.T + bias
    kappa = relative_flatness(*inputs_for_gradient("head", weight, bias, features, logits), labels, loss=loss)
    actual = _grads(kappa, (weight, bias, features))
    _assert_rel(actual[0], expected[0])
    _assert_rel(actual[1], expected[1])
    assert float(actual[2].abs().max()) == 0.0


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_weights_mode_holds_the_traces(loss):
    weight, bias, features, labels = _problem(loss)
    brute = hessian_relative_flatness(weight, features.detach(), labels, bias, loss=loss, hold_traces=True)
    (expected,) = _grads(brute, (weight,))
    logits = features @ weight.T + bias
    kappa = relative_flatness(*inputs_for_gradient("weights", weight, bias, features, logits), labels, loss=loss)
    actual = _grads(kappa, (weight, bias, features))
    _assert_rel(actual[0], expected)
    assert float(actual[1].abs().max()) == 0.0 and float(actual[2].abs().max()) == 0.0


def test_bf16_inputs_are_reduced_in_float32_within_1e_2():
    weight, bias, features, labels = (
        t.detach().float() if t.is_floating_point() else t for t in _problem("cross_entropy")
    )
    logits = features @ weight.T + bias
    exact = relative_flatness(weight, features, logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = relative_flatness(weight.bfloat16(), features.bfloat16(), logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert abs(float(half) - float(exact)) <= 1e-2 * float(exact)


def test_unknown_loss_name_is_refused_with_the_choices():
    weight, bias, features, labels = _problem("cross_entropy")
    with pytest.raises(ValueError, match="Unknown loss 'hinge'.*cross_entropy"):
        relative_flatness(weight, features, features @ weight.T, labels, loss="hinge")


def test_shapes_that_are_not_a_linear_head_are_refused():
    weight, bias, features, labels = _problem("cross_entropy")
    with pytest.raises(ValueError, match="do not form a linear head"):
        relative_flatness(weight, features[:, :3], features @ weight.T, labels)


def test_unknown_gradient_mode_is_refused():
    weight, bias, features, _ = _problem("cross_entropy")
    with pytest.raises(ValueError, match="fam_gradient"):
        inputs_for_gradient("backbone", weight, bias, features, features @ weight.T)


@pytest.mark.parametrize("gradient", ["full", "head", "weights"])
def test_chunked_rows_give_the_same_value_and_gradients(gradient, monkeypatch):
    from fam_hf import flatness

    weight, bias, features, labels = _problem("cross_entropy", leading=(3, 5))
    inputs = (weight, bias, features)

    def value_and_grads():
        logits = features @ weight.T + bias
        kappa = relative_flatness(*inputs_for_gradient(gradient, weight, bias, features, logits), labels)
        return kappa, _grads(kappa, inputs)

    whole, whole_grads = value_and_grads()
    monkeypatch.setattr(flatness, "CHUNK_ELEMENTS", 2 * WIDTH)  # chunks of 2 rows, the last one short
    chunked, chunked_grads = value_and_grads()
    _assert_rel(chunked, whole, tol=1e-12)
    for actual, expected in zip(chunked_grads, whole_grads):
        _assert_rel(actual, expected, tol=1e-12)
    assert float(whole_grads[0].abs().max()) > 0


def test_wide_heads_use_the_feature_route_and_agree_with_brute_force():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(9, 3, dtype=torch.float64, generator=generator).requires_grad_()  # more outputs than features
    features = torch.randn(6, 3, dtype=torch.float64, generator=generator).requires_grad_()
    labels = torch.randint(0, 9, (6,), generator=generator)
    kappa = relative_flatness(weight, features, features @ weight.T, labels)
    brute = hessian_relative_flatness(weight, features, labels)
    _assert_rel(kappa, brute)
    for actual, expected in zip(_grads(kappa, (weight, features)), _grads(brute, (weight, features))):
        _assert_rel(actual, expected)


@pytest.mark.parametrize("gradient", ["full", "head", "weights"])
def test_fused_head_without_logits_matches_the_materialized_head(gradient, monkeypatch):
    from fam_hf import flatness

    weight, bias, features, labels = _problem("cross_entropy", leading=(3, 5))
    inputs = (weight, bias, features)
    logits = features @ weight.T + bias
    expected = relative_flatness(*inputs_for_gradient(gradient, weight, bias, features, logits), labels)
    expected_grads = _grads(expected, inputs)
    monkeypatch.setattr(flatness, "CHUNK_ELEMENTS", 3 * WIDTH)
    fused = flatness.head_flatness_sum(gradient, weight, bias, features, None, labels)
    _assert_rel(fused.total / fused.rows, expected, tol=1e-12)
    for actual, wanted in zip(_grads(fused.total / fused.rows, inputs), expected_grads):
        _assert_rel(actual, wanted, tol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("gradient", ["full", "head", "weights"])
def test_head_flatness_sum_gives_each_modes_gradient_without_a_graph_to_the_weight(loss, gradient):
    """The trainer's path: value and gradient computed in forward, so a resharded weight is never read again."""
    from fam_hf.flatness import head_flatness_sum

    weight, bias, features, labels = _problem(loss)
    inputs = (weight, bias, features)
    logits = features @ weight.T + bias
    expected = relative_flatness(*inputs_for_gradient(gradient, weight, bias, features, logits), labels, loss=loss)
    expected_grads = _grads(expected, inputs)
    logits = features @ weight.T + bias
    flat = head_flatness_sum(gradient, weight, bias, features, logits, labels, loss=loss)
    _assert_rel(flat.total / flat.rows, expected, tol=1e-12)
    for actual, wanted in zip(_grads(flat.total / flat.rows, inputs), expected_grads):
        _assert_rel(actual, wanted, tol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_chunked_rows_for_mse_and_bce(loss, monkeypatch):
    import fam_hf.flatness as flatness

    weight, bias, features, labels = _problem(loss, leading=(3, 5))
    logits = features @ weight.T + bias
    whole = relative_flatness(weight, features, logits, labels, loss=loss)
    whole_grads = _grads(whole, (weight, features))
    monkeypatch.setattr(flatness, "CHUNK_ELEMENTS", 2 * WIDTH)
    logits = features @ weight.T + bias
    chunked = relative_flatness(weight, features, logits, labels, loss=loss)
    _assert_rel(chunked, whole, tol=1e-12)
    for actual, expected in zip(_grads(chunked, (weight, features)), whole_grads):
        _assert_rel(actual, expected, tol=1e-12)


@pytest.mark.parametrize("gradient", ["full", "head", "weights"])
def test_wide_head_in_chunks_gives_each_modes_brute_force_gradient(gradient, monkeypatch):
    """More outputs than features (a language model's head): the top classes' rows get their gradient added
    row by row, chunk after chunk."""
    from fam_hf import flatness

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(9, 3, dtype=torch.float64, generator=generator).requires_grad_()
    bias = torch.randn(9, dtype=torch.float64, generator=generator).requires_grad_()
    features = torch.randn(7, 3, dtype=torch.float64, generator=generator).requires_grad_()
    labels = torch.randint(0, 9, (7,), generator=generator)
    labels[2] = -100
    inputs = (weight, bias, features)
    held = features if gradient == "full" else features.detach()
    brute = hessian_relative_flatness(weight, held, labels, bias, hold_traces=gradient == "weights")
    monkeypatch.setattr(flatness, "CHUNK_ELEMENTS", 2 * 9)  # two rows a chunk
    flat = flatness.head_flatness_sum(gradient, weight, bias, features, features @ weight.T + bias, labels)
    _assert_rel(flat.total / flat.rows, brute)
    for actual, wanted in zip(_grads(flat.total / flat.rows, inputs), _grads(brute, inputs)):
        _assert_rel(actual, wanted)


def test_one_rows_cross_entropy_flatness_is_the_variance_of_the_head_rows_under_its_prediction():
    """docs/evidence.md: the Hessian of one row's cross-entropy in the head's weight is ``(diag(p) - p p^T) kron phi
    phi^T`` (label smoothing included), so the row's relative flatness is ``||phi||^2 (sum_s p_s ||w_s||^2 -
    ||sum_s p_s w_s||^2)``; confident predictions drive it to 0, below ``(1 - p_max) ||phi||^2 max_s ||w_s -
    w_top||^2``."""
    generator = torch.Generator().manual_seed(22)
    f64 = dict(generator=generator, dtype=torch.float64)
    weight = torch.randn(WIDTH, DIM, **f64)
    label = torch.tensor([1])
    near_one_hot = torch.zeros(WIDTH, dtype=torch.float64).index_fill(0, torch.tensor(2), 12.0)  # p_2 ~ 1 - 2e-5
    rows = [(torch.randn(DIM, **f64), torch.randn(WIDTH, **f64)) for _ in range(4)]
    for features, bias in [*rows, (rows[0][0], near_one_hot)]:
        logits = weight @ features + bias
        p = torch.softmax(logits, -1)
        kron = torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(features, features))
        for smoothing in (0.0, 0.1):
            row_loss = lambda w: F.cross_entropy((w @ features + bias)[None], label, label_smoothing=smoothing)  # noqa: B023
            brute = torch.func.hessian(row_loss)(weight)  # (m, d, m, d): d^2 loss / dW_sj dW_tk
            _assert_rel(brute.reshape(WIDTH * DIM, WIDTH * DIM), kron, tol=1e-10)
        traces = torch.einsum("sjtj->st", brute)  # Tr(H_{s,t}), the trace of each d x d block
        from_hessian = (weight @ weight.T * traces).sum()  # sum_{s,t} <w_s, w_t> Tr(H_{s,t})
        mean_row = p @ weight
        variance = features.dot(features) * (p @ weight.pow(2).sum(-1) - mean_row.dot(mean_row))
        centred = features.dot(features) * (p @ (weight - mean_row).pow(2).sum(-1))
        _assert_rel(from_hessian, variance, tol=1e-9)
        _assert_rel(relative_flatness(weight, features[None], logits[None], label), centred, tol=1e-9)

    # Sharper predictions of the same head and features: the logits scaled up, toward a one-hot p.
    features = rows[1][0]
    logits = weight @ features
    top = int(logits.argmax())
    spread = features.dot(features) * (weight - weight[top]).pow(2).sum(-1).max()
    values, bounds = [], []
    for scale in (1.0, 4.0, 16.0, 64.0, 256.0):
        value = relative_flatness(weight, features[None], scale * logits[None], label)
        others = torch.softmax(scale * logits, -1).index_fill(0, torch.tensor(top), 0.0).sum()  # 1 - p_max, exact
        bounds.append(float(others * spread))
        values.append(float(value))
        assert 0 <= values[-1] <= bounds[-1] * (1 + 1e-9)
    assert values == sorted(values, reverse=True) and bounds == sorted(bounds, reverse=True)
    assert values[-1] < 1e-12 * values[0]

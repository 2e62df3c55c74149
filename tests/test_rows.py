"""Rows the loss uses, and the unbiased row sample for large heads."""

import pytest
import torch
from tiny_models import build

from fam_hf.flatness import head_flatness_sum
from fam_hf.rows import AUTO_ROWS_MINIMUM, AutoRows, HeadTask, auto_max_rows, sample_rows, task_kind


def _lm_rows(seed=0, rows=12, dim=5, width=7):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(width, dim, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, width, (rows,), generator=generator)
    labels[[0, 5]] = -100
    return weight, features, features @ weight.T, labels


def test_sampled_rows_estimate_the_full_sum_without_bias():
    weight, features, logits, labels = _lm_rows()
    full = head_flatness_sum(None, weight, None, features, logits, labels)
    generator = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(600):
        f, z, y, counted = sample_rows(features, logits, labels, 3, generator)
        estimates.append(float(head_flatness_sum(None, weight, None, f, z, y).total) * counted / 3)
        assert counted == 10 and (y != -100).all()
    estimates = torch.tensor(estimates, dtype=torch.float64)
    standard_error = float(estimates.std()) / len(estimates) ** 0.5
    assert standard_error > 0
    assert abs(float(estimates.mean()) - float(full.total)) < 5 * standard_error


def test_no_row_is_dropped_when_the_batch_is_small_enough():
    weight, features, logits, labels = _lm_rows()
    f, z, y, counted = sample_rows(features, logits, labels, 10, torch.Generator())
    assert counted is None and f is features and z is logits and y is labels


# ---- the kind of task, from the model ----------------------------------------------------------------------------


def _tiny(class_name: str, model_type: str):
    import transformers
    from tiny_models import CONFIGS

    config = CONFIGS[model_type]()
    return getattr(transformers, class_name)(config)


@pytest.mark.parametrize(
    "class_name,model_type,loss_type,kind",
    [
        ("BertForQuestionAnswering", "bert", "ForQuestionAnswering", "question_answering"),
        ("BertForMultipleChoice", "bert", None, "multiple_choice"),
        ("LlamaForCausalLM", "llama", "ForCausalLM", "causal_lm"),
        ("BertForSequenceClassification", "bert", "ForSequenceClassification", "sequence"),
        ("ViTForImageClassification", "vit", "ForImageClassification", "sequence"),
        ("BertForTokenClassification", "bert", "ForTokenClassification", "tokens"),
        ("GPT2ForSequenceClassification", "gpt2", "ForSequenceClassification", "sequence"),
        ("GPT2LMHeadModel", "gpt2", None, "causal_lm"),
        ("BertForMaskedLM", "bert", "ForMaskedLM", "tokens"),
    ],
)
def test_the_task_kind_comes_from_loss_type_then_the_auto_mapping(class_name, model_type, loss_type, kind):
    model = _tiny(class_name, model_type)
    assert model.loss_type == loss_type  # what transformers itself says; None sends us to the auto mappings
    found, why = task_kind(model)
    assert found == kind and HeadTask.from_model(model).kind == kind
    assert why.startswith("loss_type") if loss_type is not None else "MAPPING_NAMES" in why


def test_a_class_without_the_task_in_its_name_is_placed_by_its_base_classs_auto_mapping():
    from tiny_models import CONFIGS
    from transformers import BertForMultipleChoice, BertForQuestionAnswering

    class Reader(BertForQuestionAnswering):
        pass

    class Picker(BertForMultipleChoice):
        pass

    reader, picker = Reader(CONFIGS["bert"]()), Picker(CONFIGS["bert"]())
    assert reader.loss_type is None and picker.loss_type is None
    assert task_kind(reader)[0] == "question_answering" and task_kind(picker)[0] == "multiple_choice"


def test_a_loss_type_wins_over_the_auto_mapping():
    """loss_type is what the model's own loss_function computes (decoder-only speech models in transformers'
    speech seq2seq mapping shift their labels like a causal LM, for example), so it decides when it is set."""
    from tiny_models import CONFIGS
    from transformers import BertForMultipleChoice

    model = BertForMultipleChoice(CONFIGS["bert"]())
    assert task_kind(model)[0] == "multiple_choice"
    model.loss_type = "ForTokenClassification"
    assert task_kind(model)[0] == "tokens"


def test_encoder_decoder_generation_reads_decoder_labels_unshifted():
    from transformers import AutoConfig, BartForConditionalGeneration

    config = AutoConfig.for_model(
        "bart",
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        vocab_size=40,
    )
    model = BartForConditionalGeneration(config)
    assert model.loss_type == "ForConditionalGeneration" and task_kind(model)[0] == "tokens"


def test_a_problem_type_makes_an_unlisted_model_a_sequence_classifier():
    from types import SimpleNamespace

    from torch import nn

    model = nn.Linear(3, 2)
    assert task_kind(model)[0] is None
    model.config = SimpleNamespace(problem_type="multi_label_classification", num_labels=2)
    task = HeadTask.from_model(model)
    assert task.kind == "sequence" and task.loss_for(None) == "bce"


def test_auto_rows_keep_classifiers_exact_and_sample_a_wide_head():
    classifier = build("bert", "sequence")
    assert auto_max_rows(classifier, tuple(classifier.classifier.weight.shape)) is None
    lm = build("llama", "causal_lm")
    budget = auto_max_rows(lm, tuple(lm.lm_head.weight.shape))
    assert isinstance(budget, AutoRows) and 0 < budget.fraction < 1
    assert budget(10) == AUTO_ROWS_MINIMUM  # small batches: the minimum, so every row of them
    assert budget(100_000) == pytest.approx(budget.fraction * 100_000, abs=1)  # the budget follows the batch


def test_auto_rows_budget_for_a_large_vocabulary_lm_shape():
    """SmolLM2-135M's shape (576 x 49152 tied head, 30 layers): about a tenth of the rows, at least 32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    budget = auto_max_rows(model, (49152, 576))
    assert 0.05 < budget.fraction < 0.2
    assert budget(512) < 512 / 3

"""Finding the head across model families and through PEFT, and the errors when there is none."""

import pytest
import torch
from tiny_models import build
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from fam_hf import find_head
from fam_hf.head import linear_weight

SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)


@pytest.mark.parametrize(
    "model_type,task,expected",
    [
        ("bert", "sequence", "classifier"),
        ("roberta", "sequence", "classifier.out_proj"),
        ("distilbert", "sequence", "classifier"),
        ("vit", "sequence", "classifier"),
        ("gpt2", "sequence", "score"),
        ("llama", "sequence", "score"),
        ("llama", "causal_lm", "lm_head"),
        ("gpt2", "causal_lm", "lm_head"),
        ("bert", "tokens", "classifier"),
    ],
)
def test_finds_the_head_of_each_family(model_type, task, expected):
    assert find_head(build(model_type, task))[0] == expected


def test_finds_bart_resnet_and_masked_lm_heads():
    bart = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(
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
    )
    resnet = AutoModelForImageClassification.from_config(
        AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )
    masked = AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", **SMALL, vocab_size=40))
    assert find_head(bart)[0] == "classification_head.out_proj"
    assert find_head(resnet)[0] == "classifier.1"
    assert find_head(masked)[0] == "cls.predictions.decoder"


def test_a_named_head_is_used():
    model = build("bert", "sequence")
    name, module = find_head(model, "bert.pooler.dense")
    assert name == "bert.pooler.dense" and module is model.bert.pooler.dense


def test_no_head_lists_candidates_and_the_setting():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"No head found.*fam_layer.*candidates: \['0', '2'\]"):
        find_head(model)


def test_a_named_head_that_is_not_linear_is_refused_with_its_linear_children():
    model = build("roberta", "sequence")
    with pytest.raises(ValueError, match=r"not a linear layer.*classifier\.out_proj"):
        find_head(model, "classifier")


def test_an_unknown_name_lists_candidates():
    with pytest.raises(ValueError, match="names no module.*classifier"):
        find_head(build("bert", "sequence"), "head.nope")


def test_modules_to_save_head_resolves_to_the_active_copy():
    peft = pytest.importorskip("peft")
    model = build("bert", "sequence")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    wrapped = peft.get_peft_model(model, config)
    name, head = find_head(wrapped)
    weight, bias = linear_weight(head)
    active = head.modules_to_save["default"]
    assert weight is active.weight and bias is active.bias
    assert active.weight.requires_grad and not head.original_module.weight.requires_grad


def test_lora_on_the_head_gives_the_effective_weight_the_forward_uses():
    peft = pytest.importorskip("peft")
    model = build("llama", "causal_lm")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]))
    _, head = find_head(wrapped)
    with torch.no_grad():
        head.lora_B["default"].weight.normal_()
    features = torch.randn(5, 16, dtype=torch.float64)
    weight, bias = linear_weight(head)
    head.eval()
    torch.testing.assert_close(head(features), features @ weight.T + (0 if bias is None else bias))
    assert not torch.allclose(weight, head.get_base_layer().weight)


def test_conv1d_heads_are_read_transposed():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(3, 5)
    weight, bias = linear_weight(layer)
    features = torch.randn(2, 5)
    torch.testing.assert_close(layer(features), features @ weight.T + bias)


def test_finds_question_answering_and_multiple_choice_heads():
    from transformers import AutoModelForMultipleChoice, AutoModelForQuestionAnswering

    config = AutoConfig.for_model("bert", **SMALL, vocab_size=40)
    qa = AutoModelForQuestionAnswering.from_config(config)
    mc = AutoModelForMultipleChoice.from_config(config)
    assert find_head(qa)[0] == "qa_outputs" and qa.qa_outputs.out_features == 2
    assert find_head(mc)[0] == "classifier" and mc.classifier.out_features == 1


def test_head_shape_reads_the_declared_sizes_through_peft_and_conv1d():
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from fam_hf.head import head_shape

    assert head_shape(nn.Linear(3, 5)) == (5, 3)
    assert head_shape(Conv1D(5, 3)) == (5, 3)  # transformers' Conv1D(nf=outputs, nx=inputs) stores (inputs, outputs)
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 7)), peft.LoraConfig(r=2, target_modules=["1"])
    )
    assert head_shape(model.base_model.model[1]) == (7, 3)


def test_a_classifier_under_an_unknown_name_is_the_last_linear_layer_with_num_labels_outputs():
    """XLNet's head is ``logits_proj``; a guess by width, which the certificate checks against the model's loss."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("xlnet", d_model=16, n_layer=1, n_head=2, d_inner=24, vocab_size=40, num_labels=3)
    assert find_head(AutoModelForSequenceClassification.from_config(config))[0] == "logits_proj"

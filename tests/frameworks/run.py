"""Run finetuning frameworks, unmodified, under ``fam-hf launch``: one venv per framework (``setup.sh NAME``).

    python tests/frameworks/run.py llamafactory        # or axolotl, st (sentence-transformers, setfit, TRL), all
    python tests/frameworks/run.py st --cases st_mnrl_fam,setfit_plain
    python tests/frameworks/run.py all --list          # the cases and their commands, nothing run

Not a pytest module (pytest collects ``test_*.py`` only): it needs the venvs of ``setup.sh`` and takes minutes.
The driver itself needs only the standard library; everything that needs torch runs in the framework's venv.

For each framework it writes, into a temporary folder, a tiny model built from a config (a 2-layer Llama, or a
2-layer BERT for sentence-transformers and setfit), a tokenizer trained there with ``tokenizers``, a tiny dataset
(JSON) and the framework's config (LLaMA-Factory YAMLs for full SFT and LoRA, axolotl YAMLs for full finetuning and
LoRA, with ``fam_share: 0.05`` in them; scripts for sentence-transformers, setfit and TRL), then runs each case: the
framework's own command under ``fam-hf launch`` (its console script, ``-m MODULE``, the script path), the plain
command, and ``fam-hf launch --fam_lambda 0 -- ...``, with ``FAM_HF_LAUNCH_RECORD`` set. It prints per case the
command, the exit status, the last lines of stderr and what the record says (trainers, steps, penalized steps,
resolved ``fam_lambda``, the settings the trainer saw), compares the final weights (safetensors in the output
folder) with the plain run's bit for bit, and writes everything to ``benchmarks/results/frameworks.json`` (each
framework's entry replaced, the others kept).

It makes no assumption about what the launcher accepts: a case the launcher refuses is recorded as it printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENVS = Path(os.environ.get("FW_VENVS", "/work/fw_venvs"))
RESULTS = REPO / "benchmarks" / "results" / "frameworks.json"
FRAMEWORKS = ("llamafactory", "axolotl", "st")
TAIL = 15  # lines of stderr printed and kept per case
FAM_SHARE = 0.05  # in every FAM config: the default is 0.001, so the record shows whether the config's reached

# ---- assets (run inside a venv: ``python run.py --make-assets KIND FOLDER``) ------------------------------------

WORDS = "red green blue cat dog bird one two three four five six seven eight nine ten apple pear plum tree".split()


def alpaca_rows(n: int = 16) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        start = i % 8
        rows.append(
            {
                "instruction": f"Count on from {WORDS[6 + start]}.",
                "input": "",
                "output": " ".join(WORDS[6 + start : 6 + start + 3]),
            }
        )
    return rows


def pair_rows(n: int = 16) -> list[dict[str, object]]:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        rows.append(
            {
                "anchor": f"the {a} and the {b}",
                "positive": f"a {b} with a {a}",
                "sentence1": f"the {a} and the {b}",
                "sentence2": f"a {b} with a {a}" if i % 2 == 0 else f"no {WORDS[(i + 5) % len(WORDS)]} here",
                "label": float(i % 2 == 0),
                "text": f"the {a} likes the {b}",
                "class": i % 2,
            }
        )
    return rows


def make_assets(kind: str, folder: Path) -> None:
    """Write the tiny model + tokenizer (``folder/model``) and the datasets (``folder/data``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, BertTokenizerFast, PreTrainedTokenizerFast

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    alpaca, pairs = alpaca_rows(), pair_rows()
    (data / "tiny_alpaca.json").write_text(json.dumps(alpaca, indent=1))
    (data / "tiny_alpaca.jsonl").write_text("".join(json.dumps(row) + "\n" for row in alpaca))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny_alpaca.json"}}))
    (data / "pairs.json").write_text(json.dumps(pairs, indent=1))
    texts = [" ".join(row.values()) for row in alpaca] + [str(row) for row in pairs] + [" ".join(WORDS)] * 4
    torch.manual_seed(0)
    model_dir = folder / "model"
    if kind == "llama":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        specials = ["<pad>", "<s>", "</s>"]
        backend.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
        )
        config = AutoConfig.for_model(
            "llama",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        model = AutoModelForCausalLM.from_config(config)
    elif kind == "bert":
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.train_from_iterator(
            texts,
            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
        )
        vocab = sorted(backend.get_vocab().items(), key=lambda item: item[1])
        (folder / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))
        tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=64)
        config = AutoConfig.for_model(
            "bert",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModel.from_config(config)
    else:
        raise SystemExit(f"unknown asset kind {kind}")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"assets: {kind} model ({sum(p.numel() for p in model.parameters())} parameters) in {model_dir}")


# ---- the framework scripts (written into the temporary folder; they know nothing of FAM) ------------------------

ST_SCRIPT = '''"""sentence-transformers: a bi-encoder with MultipleNegativesRankingLoss, or a CrossEncoder with
BinaryCrossEntropyLoss. python st_train.py (mnrl | ce) MODEL_DIR DATA_JSON OUTPUT_DIR"""
import sys

from datasets import Dataset
from transformers import set_seed

mode, model_dir, data_json, output_dir = sys.argv[1:5]
set_seed(42)
rows = Dataset.from_json(data_json)
if mode == "mnrl":
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, models
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    body = models.Transformer(model_dir)
    model = SentenceTransformer(modules=[body, models.Pooling(body.get_word_embedding_dimension())], device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", seed=42, use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=rows.select_columns(["anchor", "positive"]),
        loss=MultipleNegativesRankingLoss(model),
    )
else:
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model = CrossEncoder(model_dir, num_labels=1, device="cpu")
    args = CrossEncoderTrainingArguments(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", seed=42, use_cpu=True,
    )
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=rows.select_columns(["sentence1", "sentence2", "label"]),
        loss=BinaryCrossEntropyLoss(model),
    )
trainer.train()
model.save_pretrained(output_dir)
print("trained", type(trainer).__mro__[:3])
'''

SETFIT_SCRIPT = '''"""setfit: a SetFit model (sentence-transformers body, logistic regression head), a few
contrastive steps. python setfit_train.py MODEL_DIR DATA_JSON OUTPUT_DIR"""
import sys

from datasets import Dataset
from transformers import set_seed

model_dir, data_json, output_dir = sys.argv[1:4]
set_seed(42)
from sentence_transformers import SentenceTransformer, models
from setfit import SetFitModel, Trainer, TrainingArguments

body = models.Transformer(model_dir)
st = SentenceTransformer(modules=[body, models.Pooling(body.get_word_embedding_dimension())], device="cpu")
model = SetFitModel(model_body=st, model_head=__import__("sklearn.linear_model").linear_model.LogisticRegression())
rows = Dataset.from_json(data_json).select_columns(["text", "class"]).rename_column("class", "label")
args = TrainingArguments(output_dir=output_dir, batch_size=4, num_epochs=1, max_steps=3, num_iterations=2, seed=42,
                         report_to="none", logging_steps=1, save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=rows)
trainer.train()
model.save_pretrained(output_dir)
print("trained", type(trainer).__mro__[:3])
'''


def lf_yaml(work: Path, case: str, lora: bool, extra: dict) -> Path:
    config = {
        "model_name_or_path": str(work / "model"),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora" if lora else "full",
        **({"lora_target": "all", "lora_rank": 4, "lora_alpha": 8} if lora else {}),
        "dataset": "tiny",
        "dataset_dir": str(work / "data"),
        "template": "default",
        "cutoff_len": 64,
        "max_samples": 16,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(work / "out" / case),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": 3,
        "lr_scheduler_type": "constant",
        "seed": 42,
        "report_to": "none",
        "plot_loss": False,
        **extra,
    }
    path = work / f"{case}.yaml"
    path.write_text(dump_yaml(config))
    return path


def ax_yaml(work: Path, case: str, lora: bool, extra: dict) -> Path:
    config = {
        "base_model": str(work / "model"),
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(work / "data" / "tiny_alpaca.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(work / "prepared" / case),
        "val_set_size": 0,
        "output_dir": str(work / "out" / case),
        "sequence_len": 512,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "learning_rate": 1.0e-3,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        "special_tokens": {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"},
        # axolotl turns on its Triton LoRA kernels by itself, which need CUDA: off on CPU
        **({"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
            "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False} if lora else {}),
        "fam_share": FAM_SHARE,
        **extra,
    }
    path = work / f"{case}.yml"
    path.write_text(dump_yaml(config))
    return path


def dump_yaml(value, indent: int = 0) -> str:
    """A tiny YAML writer (the driver has no pyyaml): dicts, lists of dicts, scalars (JSON scalars are YAML)."""
    pad = " " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:\n{dump_yaml(item, indent + 2)}")
        elif isinstance(item, list):
            lines.append(f"{pad}{key}:")
            for element in item:
                body = dump_yaml(element, indent + 4).lstrip()
                lines.append(f"{pad}  - {body}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(lines) + "\n"


# ---- the cases -----------------------------------------------------------------------------------------------


def cases_for(framework: str, work: Path) -> list[dict]:
    """Each case: name, cmd, env (extra), plain (the case whose weights it is compared with), out (output folder)."""
    fam = {"fam_share": FAM_SHARE}
    out = lambda case: str(work / "out" / case)  # noqa: E731
    cases: list[dict] = []

    def add(name, cmd, plain=None, env=None, note=""):
        cases.append({"name": name, "cmd": cmd, "plain": plain, "env": env or {}, "out": out(name), "note": note})

    l0 = ["fam-hf", "launch", "--fam_lambda", "0", "--"]
    if framework == "llamafactory":
        for kind, lora in (("full", False), ("lora", True)):
            p = f"lf_{kind}"
            add(f"{p}_plain", ["llamafactory-cli", "train", str(lf_yaml(work, f"{p}_plain", lora, {}))])
            add(f"{p}_fam_m", ["fam-hf", "launch", "-m", "llamafactory.cli", "train",
                               str(lf_yaml(work, f"{p}_fam_m", lora, fam))], plain=f"{p}_plain")
            add(f"{p}_fam_cli", ["fam-hf", "launch", "llamafactory-cli", "train",
                                 str(lf_yaml(work, f"{p}_fam_cli", lora, fam))], plain=f"{p}_plain",
                note="the console script by name")
            add(f"{p}_lambda0_launcher", [*l0, "llamafactory-cli", "train",
                                          str(lf_yaml(work, f"{p}_lambda0_launcher", lora, {}))], plain=f"{p}_plain",
                note="fam_lambda 0 given to the launcher; the YAML is the plain one")
            add(f"{p}_lambda0_yaml", ["fam-hf", "launch", "-m", "llamafactory.cli", "train",
                                      str(lf_yaml(work, f"{p}_lambda0_yaml", lora, {"fam_lambda": 0.0}))],
                plain=f"{p}_plain", note="fam_lambda: 0 in the YAML")
        add("lf_full_fam_script", ["fam-hf", "launch", str(VENVS / framework / "bin" / "llamafactory-cli"), "train",
                                   str(lf_yaml(work, "lf_full_fam_script", False, fam))], plain="lf_full_plain",
            note="the console script's file path")
        add("lf_full_fam_torchrun", ["fam-hf", "launch", "-m", "llamafactory.cli", "train",
                                     str(lf_yaml(work, "lf_full_fam_torchrun", False, fam))],
            env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "PORT"},
            note="FORCE_TORCHRUN=1 NPROC_PER_NODE=2: the CLI re-launches itself under torchrun (2 CPU processes)")
        add("lf_full_lambda0_torchrun", [*l0, "llamafactory-cli", "train",
                                         str(lf_yaml(work, "lf_full_lambda0_torchrun", False, {}))],
            plain="lf_full_plain_torchrun", env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "PORT"},
            note="fam_lambda 0 under torchrun, against the plain torchrun run")
        add("lf_full_plain_torchrun", ["llamafactory-cli", "train",
                                       str(lf_yaml(work, "lf_full_plain_torchrun", False, {}))],
            env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "PORT"},
            note="the plain run under torchrun, for reference")
    elif framework == "axolotl":
        for kind, lora in (("full", False), ("lora", True)):
            p = f"ax_{kind}"
            add(f"{p}_plain", ["python", "-m", "axolotl.cli.train", str(ax_yaml(work, f"{p}_plain", lora, {}))],
                note="fam_share: 0.05 is in the YAML here too: axolotl's schema drops keys it does not know")
            add(f"{p}_plain_again", ["python", "-m", "axolotl.cli.train",
                                     str(ax_yaml(work, f"{p}_plain_again", lora, {}))], plain=f"{p}_plain",
                note="the plain run twice: is the framework itself deterministic here?")
            add(f"{p}_fam_m", ["fam-hf", "launch", "-m", "axolotl.cli.train",
                               str(ax_yaml(work, f"{p}_fam_m", lora, {}))], plain=f"{p}_plain")
            add(f"{p}_fam_cli", ["fam-hf", "launch", "axolotl", "train", str(ax_yaml(work, f"{p}_fam_cli", lora, {}))],
                plain=f"{p}_plain", note="the console script by name")
            add(f"{p}_lambda0_launcher", [*l0, "-m", "axolotl.cli.train",
                                          str(ax_yaml(work, f"{p}_lambda0_launcher", lora, {}))], plain=f"{p}_plain")
        add("ax_full_fam_cli_python", ["fam-hf", "launch", "axolotl", "train",
                                       str(ax_yaml(work, "ax_full_fam_cli_python", False, {})), "--launcher", "python"],
            plain="ax_full_plain", note="axolotl train execs accelerate launch by default; --launcher python does not")
        add("ax_full_share_launcher", ["fam-hf", "launch", "--fam_share", str(FAM_SHARE), "--", "-m",
                                       "axolotl.cli.train", str(ax_yaml(work, "ax_full_share_launcher", False, {}))],
            plain="ax_full_plain", note="fam_share given to the launcher, as the YAML's is dropped")
    elif framework == "st":
        st, sf = str(work / "st_train.py"), str(work / "setfit_train.py")
        (work / "st_train.py").write_text(ST_SCRIPT)
        (work / "setfit_train.py").write_text(SETFIT_SCRIPT)
        model, data = str(work / "model"), str(work / "data" / "pairs.json")
        for mode in ("mnrl", "ce"):
            p = f"st_{mode}"
            add(f"{p}_plain", ["python", st, mode, model, data, out(f"{p}_plain")])
            add(f"{p}_fam", ["fam-hf", "launch", st, mode, model, data, out(f"{p}_fam")], plain=f"{p}_plain")
            add(f"{p}_lambda0_launcher", [*l0, st, mode, model, data, out(f"{p}_lambda0_launcher")],
                plain=f"{p}_plain")
        add("setfit_plain", ["python", sf, model, data, out("setfit_plain")])
        add("setfit_fam", ["fam-hf", "launch", sf, model, data, out("setfit_fam")], plain="setfit_plain")
        add("setfit_lambda0_launcher", [*l0, sf, model, data, out("setfit_lambda0_launcher")], plain="setfit_plain")
        sft = str(REPO / "tests" / "scripts" / "launch_sft.py")
        common = ["--max_steps", "3", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
                  "--use_cpu", "true", "--seed", "42"]
        add("trl_sft_plain", ["python", sft, "--output_dir", out("trl_sft_plain"), *common],
            note="tests/scripts/launch_sft.py: a script in the shape of TRL's sft.py")
        add("trl_sft_fam", ["fam-hf", "launch", sft, "--output_dir", out("trl_sft_fam"), *common,
                            "--fam_share", str(FAM_SHARE)], plain="trl_sft_plain")
        add("trl_sft_fam_fp32", ["fam-hf", "launch", sft, "--output_dir", out("trl_sft_fam_fp32"), *common,
                                 "--fam_share", str(FAM_SHARE), "--bf16", "false"], plain="trl_sft_plain",
            note="SFTConfig's bf16 default turned off")
        add("trl_sft_lambda0_args", ["fam-hf", "launch", sft, "--output_dir", out("trl_sft_lambda0_args"), *common,
                                     "--fam_lambda", "0"], plain="trl_sft_plain", note="--fam_lambda 0 to the script")
        add("trl_sft_lambda0_launcher", [*l0, sft, "--output_dir", out("trl_sft_lambda0_launcher"), *common],
            plain="trl_sft_plain")
    return cases


# ---- running and reading back -------------------------------------------------------------------------------


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def base_env(venv: Path, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAM_HF_", "PYTHON"))}
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        HF_HOME=str(work / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        WANDB_DISABLED="true",
        WANDB_MODE="disabled",
        AXOLOTL_DO_NOT_TRACK="1",
        DO_NOT_TRACK="1",
        DISABLE_VERSION_CHECK="1",  # LLaMA-Factory's own version check
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    return env


def run_case(case: dict, venv: Path, work: Path, timeout: int) -> dict:
    record = work / "records" / f"{case['name']}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    env = base_env(venv, work)
    env.update({k: (free_port() if v == "PORT" else v) for k, v in case["env"].items()})
    env["FAM_HF_LAUNCH_RECORD"] = str(record)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    shown = " ".join(f"{k}={v}" for k, v in case["env"].items()) + (" " if case["env"] else "")
    print(f"\n=== {case['name']}: {shown}{' '.join(case['cmd'])}" + (f"   # {case['note']}" if case["note"] else ""))
    started = time.time()
    with open(logs / f"{case['name']}.out", "w") as out, open(logs / f"{case['name']}.err", "w") as err:
        try:
            process = subprocess.run(
                ["nice", "-n", "10", *case["cmd"]], cwd=work, env=env, stdout=out, stderr=err, timeout=timeout,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            status: int | str = process.returncode
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout} s"
        except FileNotFoundError as error:
            status = f"not started: {error}"
    seconds = round(time.time() - started, 1)
    stderr = (logs / f"{case['name']}.err").read_text(errors="replace").splitlines()
    stderr = [line for line in stderr if shown_line(line)]
    stdout = (logs / f"{case['name']}.out").read_text(errors="replace").splitlines()
    result = {
        "name": case["name"],
        "command": shown + " ".join(case["cmd"]),
        "note": case["note"],
        "exit": status,
        "seconds": seconds,
        "stderr_tail": stderr[-TAIL:],
        "stdout_tail": stdout[-5:],
        "fam_lines": [line for line in stderr + stdout if "fam" in line.lower() and "fam_hf/" not in line][-8:],
        "error_lines": [line for line in stderr if is_error(line)][-4:],
        "launcher_lines": launcher_lines(stderr),
        "record": read_record(record),
        "weights": weights_in(Path(case["out"])),
    }
    print(f"exit {status} after {seconds} s")
    print("stderr (last lines):")
    for line in result["stderr_tail"]:
        print(f"  | {line[:300]}")
    for line in result["error_lines"]:
        print(f"  error: {line[:400]}")
    for line in result["launcher_lines"]:
        print(f"  launcher: {line[:600]}")
    print("record:", json.dumps(result["record"], default=str)[:1500])
    return result


def launcher_lines(lines: list[str]) -> list[str]:
    """The launcher's own lines (``fam-hf launch: ...``) and its summary of what FAM did (indented under it)."""
    kept, in_summary = [], False
    for line in lines:
        if line.startswith("fam-hf launch:"):
            kept.append(line)
            in_summary = "what FAM did" in line
        elif in_summary and line.startswith("  "):
            kept.append(line)
        else:
            in_summary = False
    return kept[-12:]


def is_error(line: str) -> bool:
    """An exception's last line, a refusal, or the launcher's own message."""
    text = line.strip()
    head = text.split(":", 1)[0].split()[-1] if ":" in text and text.split(":", 1)[0].split() else ""
    return (head.endswith(("Error", "Exception", "Exit", "Interrupt")) or text.startswith("fam-hf")
            or "FAM never ran" in text or "FAM cannot" in text)


def shown_line(line: str) -> bool:
    """Progress bars and blank lines are left out of the tails."""
    text = line.strip()
    return bool(text) and not any(mark in text for mark in ("it/s]", "s/it]", "?it/s]", "B/s]"))


def read_record(path: Path) -> dict | None:
    """The launcher's record, summarized: per trainer its class, steps, penalized steps, fam_lambda, settings."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        return {"unreadable": str(error)}
    summary = {k: v for k, v in data.items() if k != "trainers"}
    summary["trainers"] = []
    for trainer in data.get("trainers", []):
        keep = {k: v for k, v in trainer.items() if k != "settings"}
        settings = trainer.get("settings") or {}
        keep["settings"] = settings
        summary["trainers"].append(keep)
    return summary


# ---- weights, bit for bit (safetensors read by hand: the driver has no torch) --------------------------------


def weights_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if "checkpoint-" not in str(p))


def read_safetensors(path: Path) -> dict[str, tuple[str, bytes]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        body = f.read()
    return {
        name: (meta["dtype"], body[meta["data_offsets"][0] : meta["data_offsets"][1]])
        for name, meta in header.items()
        if name != "__metadata__"
    }


def max_abs_diff(dtype: str, a: bytes, b: bytes) -> float | None:
    if dtype == "F32":
        x, y = array("f", a), array("f", b)
    elif dtype == "BF16":
        x = array("f", b"".join(b"\0\0" + a[i : i + 2] for i in range(0, len(a), 2)))
        y = array("f", b"".join(b"\0\0" + b[i : i + 2] for i in range(0, len(b), 2)))
    else:
        return None
    return max((abs(p - q) for p, q in zip(x, y)), default=0.0)


def compare_weights(first: Path, second: Path) -> dict:
    files = [f for f in weights_in(first) if (second / f).exists()]
    if not files:
        return {"verdict": "no weights to compare", "first": weights_in(first), "second": weights_in(second)}
    tensors = differing = 0
    largest = 0.0
    for name in files:
        a, b = read_safetensors(first / name), read_safetensors(second / name)
        if set(a) != set(b):
            return {"verdict": "different tensor names", "files": files}
        for key in a:
            tensors += 1
            if a[key] != b[key]:
                differing += 1
                diff = max_abs_diff(a[key][0], a[key][1], b[key][1]) if a[key][0] == b[key][0] else None
                largest = max(largest, diff or 0.0)
    verdict = "identical (bit for bit)" if not differing else f"differ: {differing} of {tensors} tensors"
    return {"verdict": verdict, "files": files, "tensors": tensors, "max_abs_diff": largest}


# ---- driver -------------------------------------------------------------------------------------------------


def versions_of(venv: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\nout = {}\n"
        "for n in ['torch','transformers','trl','peft','accelerate','datasets','llamafactory','axolotl',"
        "'sentence-transformers','setfit','torchaudio','torchvision','fam_hf']:\n"
        "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))"
    )
    try:
        return json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                                         text=True, check=True).stdout)
    except (subprocess.CalledProcessError, ValueError, FileNotFoundError) as error:
        return {"error": str(error)}


def run_framework(framework: str, only: set[str] | None, keep: bool, list_only: bool) -> dict:
    venv = VENVS / framework
    work = Path(tempfile.mkdtemp(prefix=f"fw_{framework}_"))
    try:
        cases = cases_for(framework, work)
        if only:
            prefixes = tuple(o[:-1] for o in only if o.endswith("*"))
            cases = [c for c in cases if c["name"] in only or (prefixes and c["name"].startswith(prefixes))]
        if list_only:
            for case in cases:
                print(f"{case['name']}: {' '.join(case['cmd'])}")
            return {}
        if not (venv / "bin" / "python").exists():
            print(f"no venv at {venv}: run bash tests/frameworks/setup.sh {framework}")
            return {"error": f"no venv at {venv}"}
        kind = "bert" if framework == "st" else "llama"
        subprocess.run(["nice", "-n", "10", str(venv / "bin" / "python"), __file__, "--make-assets", kind, str(work)],
                       env=base_env(venv, work), check=True)
        timeout = 900 if framework == "axolotl" else 600
        results = {case["name"]: run_case(case, venv, work, timeout) for case in cases}
        for case in cases:
            result = results[case["name"]]
            if case["plain"] and case["plain"] in results:
                result["weights_vs_plain"] = compare_weights(Path(case["out"]), work / "out" / case["plain"])
                print(f"weights of {case['name']} vs {case['plain']}: {result['weights_vs_plain']['verdict']}")
        return {
            "venv": str(venv),
            "versions": versions_of(venv),
            "install": f"bash tests/frameworks/setup.sh {framework}",
            "work": str(work) if keep else None,
            "cases": list(results.values()),
        }
    finally:
        if not keep and not list_only:
            shutil.rmtree(work, ignore_errors=True)
        elif list_only:
            shutil.rmtree(work, ignore_errors=True)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "fam_hf"], capture_output=True,
                               text=True).stdout.strip()
        return head + (" (fam_hf/ has uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--make-assets"]:
        make_assets(argv[1], Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", choices=[*FRAMEWORKS, "all"])
    parser.add_argument("--cases", help="comma-separated case names to run (PREFIX* for every case so named)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--list", action="store_true", help="list the cases, run nothing")
    parser.add_argument("--results", default=str(RESULTS), help="the JSON summary to update")
    parser.add_argument("--tag", help="store the results under FRAMEWORK@TAG (e.g. before), keeping FRAMEWORK's")
    args = parser.parse_args(argv)
    only = set(args.cases.split(",")) if args.cases else None
    frameworks = FRAMEWORKS if args.framework == "all" else (args.framework,)
    path = Path(args.results)
    for framework in frameworks:
        entry = run_framework(framework, only, args.keep, args.list)
        if args.list or not entry:
            continue
        entry["ran_at"] = datetime.datetime.now().isoformat(timespec="seconds")
        entry["fam_hf_commit"] = git_state()
        key = f"{framework}@{args.tag}" if args.tag else framework
        summary = json.loads(path.read_text()) if path.exists() else {}
        if only and key in summary:  # a partial rerun updates the cases it ran, keeps the others
            old = {c["name"]: c for c in summary[key].get("cases", [])}
            old.update({c["name"]: c for c in entry["cases"]})
            entry["cases"] = list(old.values())
        summary[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"\n{key}: written to {path}")
        for case in entry.get("cases", []):
            trainers = (case.get("record") or {}).get("trainers") or []
            short = "; ".join(
                f"{t.get('trainer', '?').rsplit('.', 1)[-1]} rank={t.get('rank', '-')} steps={t.get('steps')} "
                f"penalized={t.get('penalized_steps', '-')} fam_lambda={t.get('fam_lambda')} "
                f"({t.get('fam_lambda_source', '-')}) "
                f"fam_share={(t.get('settings') or {}).get('fam_share')}"
                for t in trainers
            )
            vs = case.get("weights_vs_plain", {}).get("verdict", "")
            print(f"  {case['name']:<28} exit={case['exit']!s:<4} {short or 'no trainer recorded'}"
                  + (f" | vs plain: {vs}" if vs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

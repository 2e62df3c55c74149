"""The checks that need an accelerator, one line each: ``bash tests/gpu/run.sh`` (about 5 minutes on one GPU).

- bf16: one FAM step under bf16 autocast, certified, its penalty within 2e-2 of float32's;
- fp16: five steps with fp16's GradScaler, certified, finite losses, the penalty logged;
- fsdp2 and zero3: the Trainer's own FSDP2 and DeepSpeed ZeRO-3 (one process on one GPU: the head's weight is
  sharded and gathered by the engine) against the float64 one-process reference of ``tests/scripts/one_step.py``;
- sft: FAMSFTTrainer through TRL's fused LM head (Triton kernels on CUDA) against the float64 brute force;
- overhead: FAMTrainer's step time against the Trainer's at the defaults and with the exact penalty
  (``benchmarks/overhead.py --quick``).

``--device cpu`` runs what CPUs can (bf16, sft), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import as_dataset, batch_for, build, collator, expected_update, sgd_args, snapshot, updates  # noqa: E402

from fam_hf import FAMTrainer  # noqa: E402


def _max_relative(actual: dict, expected: dict) -> float:
    scale = max(float(v.abs().max()) for v in expected.values())
    return max(float((actual[n].double().cpu() - expected[n].double().cpu()).abs().max()) for n in expected) / scale


def _step(model, batch, workdir, **args):
    before = snapshot(model)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(workdir, use_cpu=DEVICE == "cpu", **args),
        train_dataset=as_dataset(batch),
        data_collator=collator(torch.float32),
    )
    trainer.train()
    return updates(before, model), trainer


def check_bf16(workdir: str) -> str:
    model = build("llama", "causal_lm", dtype=torch.float32)
    batch = batch_for(model)
    _, exact = _step(build("llama", "causal_lm", dtype=torch.float32), batch, workdir, fam_lambda=1.0)
    _, half = _step(model, batch, workdir, fam_lambda=1.0, bf16=True)
    flatness = [next(e for e in t.state.log_history if "loss" in e)["relative_flatness"] for t in (exact, half)]
    difference = abs(flatness[1] - flatness[0]) / flatness[0]
    assert difference < 2e-2, f"bf16 penalty {flatness[1]:.6g} vs float32 {flatness[0]:.6g}"
    return f"penalty {flatness[1]:.6g} vs float32 {flatness[0]:.6g} (relative {difference:.2g}), certified"


def check_fp16(workdir: str) -> str:
    model = build("llama", "causal_lm", dtype=torch.float32)
    data = batch_for(model, size=40)
    args = sgd_args(workdir, batch_size=8, fam_share=0.01, fp16=True, use_cpu=False)
    args.max_steps = 5
    trainer = FAMTrainer(model=model, args=args, train_dataset=as_dataset(data), data_collator=collator(torch.float32))
    trainer.train()
    assert trainer.accelerator.scaler is not None, "fp16 training without a GradScaler"
    logs = [e for e in trainer.state.log_history if "relative_flatness" in e]
    assert len(logs) == 5 and all(torch.isfinite(torch.tensor([e["loss"], e["relative_flatness"]])).all() for e in logs)
    scale = trainer.accelerator.scaler.get_scale()
    return f"5 steps under GradScaler (scale {scale:g}), last loss {logs[-1]['loss']:.4g}"


def _sharded(engine: str, workdir: str) -> str:
    script = ROOT / "tests" / "scripts" / "one_step.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = ["--cases", "causal_lm", "classifier"]
    reference, sharded = Path(workdir) / "one.pt", Path(workdir) / "sharded.pt"
    subprocess.run([sys.executable, str(script), "--out", str(reference), *cases], check=True, env=env)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    subprocess.run([*launch, str(script), engine, "--out", str(sharded), *cases], check=True, env=env)
    one, two = torch.load(reference), torch.load(sharded)
    errors = {case: _max_relative(two[case], one[case]) for case in ("causal_lm", "classifier")}
    assert all(e < 1e-5 for e in errors.values()), errors
    return ", ".join(f"{case} {error:.2g}" for case, error in errors.items()) + " relative to float64, 1 process"


def check_fsdp2(workdir: str) -> str:
    return _sharded("--fsdp", workdir)


def check_zero3(workdir: str) -> str:
    return _sharded("--deepspeed", workdir)


def check_sft(workdir: str) -> str:
    from datasets import Dataset
    from tiny_models import tiny_tokenizer

    from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

    model = build("llama", "causal_lm")
    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    expected = expected_update(model, {"input_ids": input_ids, "labels": input_ids}, fam_lambda=2.0)
    model = model.float()
    before = snapshot(model)
    args = sgd_args(
        workdir, args_class=FAMSFTConfig, bf16=False, fam_lambda=2.0, fam_gradient="full", use_cpu=DEVICE == "cpu"
    )
    trainer = FAMSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    error = _max_relative(updates(before, model), expected)
    assert error < 1e-4, f"relative error {error:.3g}"
    return f"fused LM head step {error:.2g} from the float64 brute force, certified"


def check_overhead(workdir: str) -> str:
    out = Path(workdir) / "overhead.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--no-profile", "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = json.loads(out.read_text())
    if os.environ.get("OUT"):  # the device tool brings back what is written there
        Path(os.environ["OUT"], "overhead_gpu.json").write_text(out.read_text())
    ratios = [
        f"{model} {arm} {timing['ratio']:.3f}x"
        for model, entry in results["models"].items()
        for arm, timing in entry["timing"].items()
        if arm.startswith("fam") and "ratio" in timing
    ]
    return "step time against the Trainer's: " + ", ".join(ratios)


CHECKS = {
    "bf16": check_bf16,
    "fp16": check_fp16,
    "fsdp2": check_fsdp2,
    "zero3": check_zero3,
    "sft": check_sft,
    "overhead": check_overhead,
}
CPU_CHECKS = ("bf16", "sft")
DEVICE = "cuda"


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checks", nargs="*", default=None, help=f"subset of {list(CHECKS)}")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    DEVICE = args.device
    names = args.checks or (list(CHECKS) if DEVICE == "cuda" else list(CPU_CHECKS))
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device")
        return 1
    failed = 0
    for name in names:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                detail, status = CHECKS[name](workdir), "PASS"
            except Exception as error:  # one line per check, whatever happened
                traceback.print_exc(file=sys.stderr)
                detail, status = f"{type(error).__name__}: {str(error)[:300]}", "FAIL"
                failed += 1
        print(f"{status} {name} ({time.perf_counter() - started:.0f} s): {detail}", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

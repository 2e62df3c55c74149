"""What a whole training run costs, first batch included: peak memory and step times, each arm in its own process.

FAM checks once per run, on the first training batch, that its penalty is the curvature of the loss the model
returns (:mod:`fam_hf.certificate`), and with ``fam_lambda`` unset it also calibrates the weight there. Neither
shows in :mod:`benchmarks.overhead`, which times steps after a warm-up in one process. Here each arm trains
``--steps`` AdamW steps (3 by default) in a fresh Python process of its own, so its peak resident memory is the peak
of the whole run, first batch included:

- ``plain``: ``transformers.Trainer``;
- ``fam``: ``FAMTrainer`` at the defaults (``fam_lambda`` calibrated on the first batch, head mode, rows "auto");
- ``fam-fixed``: ``FAMTrainer`` with ``fam_lambda=0.01`` (no calibration; the certificate still runs).

Each child reports the whole run's peak memory (on CPU ``getrusage(RUSAGE_SELF).ru_maxrss`` at its end, the
process's peak resident set; on GPU ``torch.cuda.max_memory_allocated``), the first step's time and the median of
the later ("steady") steps, each step timed from the Trainer's ``on_step_begin`` to its ``on_step_end``, and whether
it completed. The models are built from configs with random weights (nothing is downloaded) and train on random
tokens generated in code. The arms' order is rotated from shape to shape (and from repeat to repeat), and the
1-minute load average is recorded before each child, because a shared machine is noisy.

``--limit-as GIB`` runs each child under an address-space limit (``prlimit --as`` when util-linux has it, else
``setrlimit(RLIMIT_AS)`` in the child before torch is imported); a child that is killed or fails to allocate is
reported as ``failed: <reason>`` in the table, and the benchmark goes on.

    python benchmarks/first_batch.py --quick                      # small shapes, a few minutes on 2 cores
    python benchmarks/first_batch.py --shapes smollm2-2x512 vocab128k-1x4096 --limit-as 16
    python benchmarks/first_batch.py                              # every full shape (the 4 x 1024 and 1 x 4096
                                                                  # SmolLM2 shapes are slow on a CPU)
    python benchmarks/first_batch.py --shapes tiny --arms plain fam --out /tmp/fb.json   # seconds

The JSON goes to ``benchmarks/results/first_batch.json`` (``first_batch_quick.json`` with ``--quick``), written
after every shape; ``--append`` keeps the shapes already in that file that this run does not measure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No torch at module level: a child sets its address-space limit before torch allocates anything.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.shapes import SMOLLM2  # noqa: E402

ARMS = ("plain", "fam", "fam-fixed")
FAM_LAMBDA = 0.01  # the fam-fixed arm's weight (the value does not change the cost)
GIB = 1024**3


@dataclass
class Shape:
    """A model and batch to train: ``kind`` is "causal_lm" (a Llama) or "sequence" (a BERT classifier)."""

    name: str
    kind: str
    config: dict[str, Any]
    batch_size: int
    seq_len: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


VOCAB128K = dict(  # Llama-3's 128,256-token vocabulary on a small body, untied
    vocab_size=128256,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


def shapes() -> dict[str, Shape]:
    """Return every shape by name: the full ones, the quick ones and ``tiny`` (for tests)."""

    def smollm(batch: int, seq: int, layers: int = 30) -> Shape:
        name = f"smollm2-{batch}x{seq}" if layers == 30 else f"smollm2-{layers}l-{batch}x{seq}"
        note = f"SmolLM2-135M shape ({layers} layers, 49,152 vocab, tied), {batch} x {seq} tokens"
        return Shape(name, "causal_lm", {**SMOLLM2, "num_hidden_layers": layers}, batch, seq, note)

    def vocab128k(batch: int, seq: int) -> Shape:
        note = f"128,256 vocab (Llama-3's), 2 layers, hidden 512, untied, {batch} x {seq} tokens"
        return Shape(f"vocab128k-{batch}x{seq}", "causal_lm", VOCAB128K, batch, seq, note)

    listed = [
        smollm(2, 512),
        smollm(4, 1024),
        smollm(1, 4096),
        vocab128k(1, 4096),
        Shape("bert-base-16x128", "sequence", dict(num_labels=2), 16, 128, "BERT-base shape, 2 labels, 16 x 128"),
        # quick
        smollm(2, 512, layers=4),
        vocab128k(1, 512),
        Shape(
            "minilm-16x128",
            "sequence",
            dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2),
            16,
            128,
            "MiniLM-L6 shape, 2 labels, 16 x 128",
        ),
        # tests: seconds
        Shape(
            "tiny",
            "causal_lm",
            dict(
                vocab_size=500,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=True,
            ),
            2,
            16,
            "tiny Llama (500 vocab, 1 layer, hidden 32), 2 x 16 tokens",
        ),
    ]
    return {shape.name: shape for shape in listed}


FULL_SHAPES = ("smollm2-2x512", "smollm2-4x1024", "smollm2-1x4096", "vocab128k-1x4096", "bert-base-16x128")
QUICK_SHAPES = ("smollm2-4l-2x512", "vocab128k-1x512", "minilm-16x128")


# ---- the child: one arm, one shape, one process ---------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    """Train one arm on one shape in this process; write what it measured to ``args.result``; return 0.

    A failure (an allocation error above all) is caught and written as ``status: "failed: ..."`` with what was
    measured until then; only a kill (the kernel's or a signal) leaves no result, which the parent reports.
    """
    if args.limit_as_bytes:  # the fallback without prlimit: before torch maps anything
        resource.setrlimit(resource.RLIMIT_AS, (args.limit_as_bytes, args.limit_as_bytes))
    result: dict[str, Any] = {"shape": args.shape, "arm": args.arm, "status": "running", "pid": os.getpid()}
    timer = None
    start = time.perf_counter()
    try:
        timer = _train(args, result)
        result["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 - MemoryError and KeyboardInterrupt are reported too
        result["status"] = f"failed: {_reason(error)}"
        result["failure_kind"] = "memory" if _is_allocation_error(error) else "error"
        result["error_type"] = type(error).__name__
        result["error"] = str(error)[:2000]
        timer = result.pop("_timer", timer)
    result.pop("_timer", None)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = _max_rss_bytes()
    if timer is not None:
        result["step_times_s"] = timer.times
        result["steps_done"] = len(timer.times)
        if timer.times:
            result["first_step_s"] = timer.times[0]
        if len(timer.times) > 1:
            result["steady_step_s"] = statistics.median(timer.times[1:])
    if result.get("device") == "cuda":
        import torch

        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_bytes"] = result["peak_cuda_bytes"]
    else:
        result["peak_bytes"] = result["peak_rss_bytes"]
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


def _train(args: argparse.Namespace, result: dict[str, Any]):
    import torch

    from benchmarks.common import setup_torch

    setup_torch(args.threads)
    device = "cuda" if args.device == "cuda" else "cpu"
    result["device"] = device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU")
    shape = shapes()[args.shape]
    timer = StepTimer(device)
    result["_timer"] = timer  # kept if training fails halfway
    model = build_model(shape)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    data = synthetic_data(shape, args.steps)
    trainer = make_trainer(args.arm, model, data, shape, timer, args, result)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["peak_rss_before_train_bytes"] = _max_rss_bytes()  # the model, the data, the libraries
    trainer.train()
    if args.arm != "plain":
        import fam_hf

        result["fam_hf_file"] = fam_hf.__file__
        result["fam_lambda"] = trainer.fam_lambda  # calibrated on the first batch for the "fam" arm
    return timer


def build_model(shape: Shape):
    """Return a randomly initialized model of the shape (seeded: every arm builds the same one)."""
    import torch

    torch.manual_seed(0)
    if shape.kind == "sequence":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**shape.config))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**shape.config))


def synthetic_data(shape: Shape, steps: int):
    """Return ``steps`` batches worth of random tokens (all counted) with labels: next tokens or classes."""
    import torch

    from benchmarks.common import TensorDictDataset

    generator = torch.Generator().manual_seed(1)
    count = shape.batch_size * steps
    vocab = shape.config.get("vocab_size", 30522)  # BertConfig's default vocabulary
    ids = torch.randint(0, vocab, (count, shape.seq_len), generator=generator)
    mask = torch.ones_like(ids)
    if shape.kind == "causal_lm":
        return TensorDictDataset(input_ids=ids, attention_mask=mask, labels=ids.clone())
    labels = torch.randint(0, shape.config["num_labels"], (count,), generator=generator)
    return TensorDictDataset(input_ids=ids, attention_mask=mask, labels=labels)


def make_trainer(arm: str, model, data, shape: Shape, timer, args: argparse.Namespace, result: dict[str, Any]):
    """Return the arm's Trainer: ``args.steps`` AdamW steps of ``shape.batch_size``, nothing saved or reported."""
    from transformers import Trainer, TrainingArguments

    from benchmarks.common import quiet_args

    workdir = tempfile.mkdtemp(prefix="fam_first_batch_")
    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=shape.batch_size,
        learning_rate=1e-5,
        optim="adamw_torch",
        logging_steps=1000,
        use_cpu=args.device != "cuda",
        seed=0,
    )
    if arm == "plain":
        trainer_args = quiet_args(TrainingArguments, workdir, **common)
        trainer = Trainer(model=model, args=trainer_args, train_dataset=data, callbacks=[timer])
    else:
        from fam_hf import FAMTrainer, FAMTrainingArguments

        fam = {"fam_lambda": FAM_LAMBDA} if arm == "fam-fixed" else {}
        trainer_args = quiet_args(FAMTrainingArguments, workdir, **fam, **common)
        trainer = FAMTrainer(model=model, args=trainer_args, train_dataset=data, callbacks=[timer])
    result["optimizer"] = str(trainer_args.optim)
    return trainer


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (``on_step_begin`` to ``on_step_end``)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback protocol
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback protocol
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def __getattr__(self, name: str):  # the other callback events do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _max_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _is_allocation_error(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or any(
        word in text for word in ("can't allocate", "cannot allocate", "out of memory", "outofmemory", "bad_alloc")
    )


def _reason(error: BaseException) -> str:
    """A one-line reason: the allocation that failed, or the error's type and first line."""
    import re

    text = str(error)
    wanted = re.search(r"tried to allocate (\d+) bytes", text)
    if wanted:
        return f"out of memory (allocating {int(wanted.group(1)) / 1e9:.3g} GB)"
    if _is_allocation_error(error):
        return f"out of memory ({type(error).__name__})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first[:150]}"


# ---- the parent: one child per arm and shape, the table, the JSON -------------------------------------------


def run_child(shape: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one arm on one shape in a fresh process (under the address-space limit if any); return its result.

    A child killed by a signal, or exiting without writing its result, is reported as failed with the reason.
    """
    limit = int(args.limit_as * GIB) if args.limit_as else 0
    with tempfile.TemporaryDirectory(prefix="fam_first_batch_child_") as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--shape", shape, "--arm", arm]
        command += ["--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
        command += ["--result", str(out)]
        prefix: list[str] = []
        if limit and args.limit_method == "prlimit":
            prefix = ["prlimit", f"--as={limit}", "--"]
        elif limit:
            command += ["--limit-as-bytes", str(limit)]
        if args.nice:
            prefix = ["nice", "-n", str(args.nice), *prefix]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        start = time.perf_counter()
        done = subprocess.run(prefix + command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.exists():
            result = json.loads(out.read_text())
        else:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            last = lines[-1][:150] if lines else ""
            memory = any(word in last.lower() for word in ("alloc", "memory"))
            reason = _exit_reason(done.returncode) + (f": {last}" if last and done.returncode > 0 else "")
            result = {"shape": shape, "arm": arm, "status": f"failed: {reason}"}
            result["failure_kind"] = "killed" if done.returncode < 0 else "memory" if memory else "error"
        if done.returncode != 0 and result.get("status") == "ok":
            result["status"] = f"failed: {_exit_reason(done.returncode)} after training"
            result["failure_kind"] = "error"
        result.update(returncode=done.returncode, wall_s=wall, load_1min_before=round(load, 2))
        if result["status"] != "ok":
            result["stderr_tail"] = done.stderr[-3000:]
    return result


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit code {returncode}"


def arm_order(arms: list[str], turn: int) -> list[str]:
    """The arms rotated by ``turn``: each arm goes first in turn, from shape to shape and repeat to repeat."""
    shift = turn % len(arms)
    return arms[shift:] + arms[:shift]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm, the medians over its repeats (completed runs only) and the ratios to the plain arm's medians."""
    summary: dict[str, dict[str, Any]] = {}
    for arm, results in runs.items():
        done = [r for r in results if r["status"] == "ok"]
        entry: dict[str, Any] = {"runs": len(results), "completed": len(done)}
        if not done:
            entry["status"] = results[-1]["status"] if results else "not run"
            summary[arm] = entry
            continue
        entry["status"] = "ok" if len(done) == len(results) else f"ok in {len(done)} of {len(results)}"
        for key in ("peak_bytes", "first_step_s", "steady_step_s"):
            values = [r[key] for r in done if r.get(key) is not None]
            entry[key] = statistics.median(values) if values else None
        summary[arm] = entry
    plain = summary.get("plain", {})
    for entry in summary.values():
        for key, ratio in (
            ("peak_bytes", "peak_ratio"),
            ("first_step_s", "first_ratio"),
            ("steady_step_s", "steady_ratio"),
        ):
            if entry.get(key) and plain.get(key):
                entry[ratio] = entry[key] / plain[key]
    return summary


def table(results: dict[str, Any]) -> str:
    """The markdown table of every shape and arm: peak memory, first step, steady step, each against plain."""
    from benchmarks.common import markdown_table

    def number(value: Any, digits: str = ".3g", suffix: str = "") -> str:
        return "-" if value is None else f"{value:{digits}}{suffix}"

    rows = []
    for name, entry in results["shapes"].items():
        limit = f"{entry['limit_as_gib']:g} GiB" if entry.get("limit_as_gib") else "-"
        for arm, row in entry["summary"].items():
            loads = ", ".join(f"{r['load_1min_before']:.2f}" for r in entry["runs"][arm])
            if row.get("completed", 0) == 0:
                rows.append([name, arm, limit, row["status"], "-", "-", "-", "-", "-", loads])
                continue
            peak = row.get("peak_bytes")
            rows.append(
                [
                    name,
                    arm,
                    limit,
                    number(peak / 1e9 if peak else None, ".3f"),
                    number(row.get("peak_ratio"), ".2f", "x"),
                    number(row.get("first_step_s"), ".3g"),
                    number(row.get("first_ratio"), ".2f", "x"),
                    number(row.get("steady_step_s"), ".3g"),
                    number(row.get("steady_ratio"), ".2f", "x"),
                    loads if row["status"] == "ok" else f"{loads} ({row['status']})",
                ]
            )
    headers = [
        "shape",
        "arm",
        "AS limit",
        "peak GB",
        "peak / plain",
        "first step s",
        "first / plain",
        "steady step s",
        "steady / plain",
        "load before",
    ]
    return markdown_table(headers, rows)


def machine() -> dict[str, Any]:
    """The machine's cores, memory and load, with the libraries' versions (``common.environment``)."""
    from benchmarks.common import environment

    info = environment()
    try:
        import psutil

        info["memory_total_bytes"] = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover - psutil is a dependency of the benchmarks
        pass
    info["prlimit"] = shutil.which("prlimit")
    info["fam_hf_source"] = fam_hf_source()
    return info


def fam_hf_source() -> dict[str, Any]:
    """Which fam_hf the children import (the one next to this file): its folder, a digest of its Python files, and
    the git commit with the files changed since it, where the folder is in a git checkout."""
    folder = ROOT / "fam_hf"
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {"path": str(folder), "sha256": digest.hexdigest()[:16]}
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (ROOT / ".git").exists():
        changed = subprocess.run([*git, "status", "--porcelain", "--", "fam_hf"], capture_output=True, text=True)
        info["git_commit"] = head.stdout.strip()
        info["changed_since_commit"] = [line[3:] for line in changed.stdout.splitlines()]
    return info


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; run the children (or be one); print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        choices=list(shapes()),
        metavar="SHAPE",
        help=f"shapes to run (default: {' '.join(FULL_SHAPES)}; of {' '.join(shapes())})",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--quick", action="store_true", help=f"the small shapes: {' '.join(QUICK_SHAPES)}")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps per run (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm per shape, in rotating order")
    parser.add_argument(
        "--limit-as",
        type=float,
        default=None,
        metavar="GIB",
        help="run each child under this address-space limit, in GiB",
    )
    parser.add_argument(
        "--limit-method",
        choices=["prlimit", "setrlimit"],
        default=None,
        help="how to apply --limit-as (default: prlimit if on PATH, else setrlimit in the child)",
    )
    parser.add_argument("--nice", type=int, default=0, help="run each child under nice -n N")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: train on the GPU, peak from torch.cuda.max_memory_allocated",
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/first_batch[_quick].json)")
    parser.add_argument("--note", default=None, help="a remark kept with each shape run now (e.g. the code's state)")
    parser.add_argument("--append", action="store_true", help="keep the shapes already in --out not run now")
    # a child's own options
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--limit-as-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.limit_method is None:
        args.limit_method = "prlimit" if shutil.which("prlimit") else "setrlimit"

    from benchmarks.common import RESULTS_DIR, write_json

    names = args.shapes or list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    path = (
        Path(args.out) if args.out else RESULTS_DIR / ("first_batch_quick.json" if args.quick else "first_batch.json")
    )
    command = "python benchmarks/first_batch.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"shapes": {}}
    if args.append and path.exists():
        results = json.loads(path.read_text())
        results.setdefault("earlier", []).append({k: results[k] for k in ("command", "machine") if k in results})
    results.update(
        machine=machine(),
        command=command,
        arms={
            "plain": "transformers.Trainer",
            "fam": "FAMTrainer at the defaults",
            "fam-fixed": f"FAMTrainer, fam_lambda={FAM_LAMBDA}",
        },
        steps=args.steps,
        peak_memory=(
            "torch.cuda.max_memory_allocated"
            if args.device == "cuda"
            else "getrusage(RUSAGE_SELF).ru_maxrss of the child at its end (its peak resident set)"
        ),
    )
    catalog = shapes()
    errors = 0
    turn = sum(1 for _ in results["shapes"])  # go on rotating across appended runs
    for name in names:
        shape = catalog[name]
        print(
            f"== {name}: {shape.note}" + (f", address space <= {args.limit_as:g} GiB" if args.limit_as else ""),
            flush=True,
        )
        start = time.perf_counter()
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
        orders = []
        for _ in range(args.repeats):
            order = arm_order(list(args.arms), turn)
            turn += 1
            orders.append(order)
            for arm in order:
                result = run_child(name, arm, args)
                runs[arm].append(result)
                errors += result.get("failure_kind") == "error"
                print(
                    f"  {arm}: {result['status']}, peak {result.get('peak_bytes', 0) / 1e9:.3f} GB, "
                    f"first step {result.get('first_step_s', float('nan')):.2f} s, "
                    f"steady {result.get('steady_step_s') or float('nan'):.2f} s, "
                    f"{result['wall_s']:.0f} s in all (load {result['load_1min_before']:.2f} before)",
                    flush=True,
                )
        results["shapes"][name] = {
            "note": shape.note,
            "kind": shape.kind,
            "config": shape.config,
            "batch_size": shape.batch_size,
            "seq_len": shape.seq_len,
            "limit_as_gib": args.limit_as,
            "limit_method": args.limit_method if args.limit_as else None,
            "nice": args.nice,
            "note_of_run": args.note,
            "fam_hf_source": results["machine"]["fam_hf_source"],
            "command": command,
            "orders": orders,
            "runs": runs,
            "summary": summarize(runs),
            "seconds": time.perf_counter() - start,
        }
        write_json(path, results)  # after every shape, so a long run keeps what it has measured
    print()
    print(table(results))
    print(f"\nwrote {path}")
    if errors:
        print(f"{errors} run(s) failed with an error other than memory: see stderr_tail in the JSON", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

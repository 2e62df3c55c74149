"""The zoo sweep: one FAM step on every architecture of transformers' auto mappings, judged by brute force.

Runs :func:`zoo.run_case` (``tests/zoo.py``) on every case of :func:`zoo.cases` and the named variants
(:func:`zoo.named_cases`), each in a worker process with a time limit, writes the results to
``benchmarks/results/zoo_coverage.json`` after every case (so a running sweep can be read), and renders
``docs/coverage.md`` from them at the end.

    python benchmarks/zoo_coverage.py                       # the whole sweep (about 20 minutes on 2 CPU cores)
    python benchmarks/zoo_coverage.py --shard 1/4 --out benchmarks/results/zoo_coverage.1of4.json
    python benchmarks/zoo_coverage.py --render a.json b.json  # merge shards, write the JSON and docs/coverage.md
    python benchmarks/zoo_coverage.py --only 'Bart|Marian'    # a regular expression over case ids
    python benchmarks/zoo_coverage.py --mappings ctc,semantic_segmentation  # these mappings, merged into the rest

With ``--mappings`` the other mappings' results in ``--out`` are kept: the new ones replace only their own, each
mapping records when and at which versions it was swept (``swept``), and docs/coverage.md is rendered from the whole.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
RESULTS = ROOT / "benchmarks" / "results" / "zoo_coverage.json"
DOCS = ROOT / "docs" / "coverage.md"
TIME_LIMIT_S = 600


def all_cases(only: str | None = None, shard: tuple[int, int] | None = None, mappings: list[str] | None = None) -> list:
    """Return the sweep's cases: every (mapping, class), then the named variants; filtered and sharded."""
    import zoo

    found = {case.id: case for case in [*zoo.cases(), *zoo.named_cases()]}
    unknown = set(mappings or ()) - set(zoo.MAPPINGS)
    if unknown:
        raise SystemExit(f"unknown mappings {sorted(unknown)}; the zoo's are {list(zoo.MAPPINGS)}")
    selected = [
        case
        for case in found.values()
        if (only is None or re.search(only, case.id)) and (mappings is None or case.mapping in mappings)
    ]
    if shard is not None:
        index, count = shard
        selected = selected[index - 1 :: count]
    return selected


def _worker(connection, gradient: str) -> None:
    """Run the cases the parent sends, one at a time, and send back each result as a dict."""
    sys.path.append(str(TESTS))  # appended: a zoo.py earlier on PYTHONPATH (a frozen copy) wins
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    import zoo

    cases = {case.id: case for case in [*zoo.cases(), *zoo.named_cases()]}
    while True:
        case_id = connection.recv()
        if case_id is None:
            return
        connection.send(asdict(zoo.run_case(cases[case_id], gradient=gradient)))


class Worker:
    """A worker process, restarted after a case that outlives its time limit or kills it."""

    def __init__(self, gradient: str):
        self.gradient = gradient
        self.context = multiprocessing.get_context("spawn")
        self.process = None

    def run(self, case, limit: float) -> dict:
        if self.process is None or not self.process.is_alive():
            self.connection, child = self.context.Pipe()
            self.process = self.context.Process(target=_worker, args=(child, self.gradient), daemon=True)
            self.process.start()
        start = time.perf_counter()
        self.connection.send(case.id)
        failure = None
        try:
            if self.connection.poll(limit):
                return self.connection.recv()
            failure = f"timed out after {limit:.0f} s"
        except EOFError:
            failure = "the worker process died"
        self.stop()
        return {
            "case": case.id,
            "mapping": case.mapping,
            "model_type": case.model_type,
            "class_name": case.class_name,
            "variant": case.variant,
            "verdict": "crashed",
            "reason": failure,
            "seconds": time.perf_counter() - start,
        }

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = None


def provenance(gradient: str) -> dict:
    """Return what the results depend on: versions, the fam_hf source and commit, the sweep's settings."""
    import torch
    import transformers
    import zoo
    import zoo_models

    import fam_hf
    from fam_hf import certificate_batch

    source = Path(fam_hf.__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "fam_hf_source": str(source),
        "commit": git("rev-parse", "--short", "HEAD"),
        "fam_hf_modified": bool(git("status", "--porcelain", "--", "fam_hf")) if source == ROOT / "fam_hf" else None,
        "settings": {
            "fam_lambda": zoo.FAM_LAMBDA,
            "learning_rate": zoo.LEARNING_RATE,
            "fam_gradient": gradient,
            "fam_max_rows": None,
            "tolerance": zoo.TOLERANCE,
            "float32_loss_tolerance": zoo.FLOAT32_LOSS_TOLERANCE,
            "bf16_tolerance": zoo.BF16_TOLERANCE,
            "bf16_kappa_tolerance": zoo.BF16_KAPPA_TOLERANCE,
            "batch": zoo_models.BATCH,
            "sequence": zoo_models.SEQ,
            "hidden_size": zoo_models.HIDDEN,
            "layers": zoo_models.LAYERS,
            "vocab_size": zoo_models.VOCAB,
            # the certificate's bounded batch: below the zoo's 4 x 8 positions, every text batch is certified on a cut
            "certificate_positions": int(
                os.environ.get(certificate_batch.POSITIONS_VARIABLE) or certificate_batch.CERTIFICATE_POSITIONS
            ),
        },
    }


def write_json(path: Path, header: dict, results: list[dict]) -> None:
    """Write the results (atomically: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.part")
    partial.write_text(json.dumps({**header, "results": results}, indent=1) + "\n")
    partial.replace(path)


def sweep(
    cases: list,
    out: Path,
    gradient: str,
    resume: bool,
    limit: float,
    commit: str | None = None,
    keep: dict | None = None,
) -> list[dict]:
    """Run the cases, rewriting ``out`` after each; with ``resume``, keep the results ``out`` already has.

    ``keep`` is an earlier sweep (``--mappings``): its results of the cases not run here are written along, in the
    sweep's order, and its per-mapping provenance (``swept``) is kept for the mappings not run here.
    """
    header = provenance(gradient)
    if commit:
        header["commit"] = commit
    mine = {case.mapping for case in cases}
    ids = {case.id for case in cases}
    kept = [r for r in (keep or {}).get("results", []) if r["case"] not in ids]
    header["swept"] = {m: p for m, p in _swept(keep or {}).items() if m not in mine}
    done = {}
    if resume and out.exists():
        done = {r["case"]: r for r in json.loads(out.read_text())["results"] if r["case"] in ids}
    results = [done[c.id] for c in cases if c.id in done]
    worker = Worker(gradient)
    start = time.perf_counter()
    try:
        for number, case in enumerate(cases, 1):
            if case.id in done:
                continue
            result = worker.run(case, limit)
            results.append(result)
            seconds = round(time.perf_counter() - start, 1)
            complete = number == len(cases)
            for mapping in sorted(mine):
                header["swept"][mapping] = {**_versions(header), "seconds": seconds, "complete": complete}
            header["sweep_seconds"] = round(sum(r.get("seconds", 0) for r in kept) + seconds, 1)
            header["complete"] = complete and all(p.get("complete", True) for p in header["swept"].values())
            write_json(out, header, _in_order([*kept, *results]))
            print(
                f"[{number}/{len(cases)}] {case.id}: {result['verdict']} {result.get('reason', '')[:120]}", flush=True
            )
    finally:
        if worker.process is not None and worker.process.is_alive():
            worker.connection.send(None)
        worker.stop()
    return results


VERSIONS = ("date", "transformers", "torch", "commit", "fam_hf_modified")


def _versions(header: dict) -> dict:
    return {k: header.get(k) for k in VERSIONS}


def _swept(data: dict) -> dict:
    """Return each mapping's provenance in a sweep: its ``swept`` entry, else the sweep's header (an older JSON)."""
    swept = dict(data.get("swept") or {})
    for mapping in dict.fromkeys(r["mapping"] for r in data.get("results", [])):
        if mapping not in swept:
            swept[mapping] = {**_versions(data), "complete": data.get("complete", True)}
    return swept


def _in_order(results: list[dict]) -> list[dict]:
    """The results in the sweep's order (cases no longer in the zoo last)."""
    order = {case.id: i for i, case in enumerate(all_cases())}
    return sorted(results, key=lambda r: order.get(r["case"], len(order)))


# ---- docs/coverage.md ---------------------------------------------------------------------------------------------


def reason_group(reason: str, length: int = 170) -> str:
    """Return a reason with its numbers, quoted names and class names elided, cut to ``length``: like reasons group."""
    reason = re.sub(r"'[\w.\[\]]+'", "'…'", reason)  # head names
    reason = re.sub(r"\b[A-Z]\w*(For|Model|LMHead|Head)\w*\b", "…", reason)  # class names
    reason = re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e[-+]?\d+)?", "N", reason)
    return reason if len(reason) <= length else reason[:length].rstrip() + " …"


def render(data: dict) -> str:
    """Return docs/coverage.md for the sweep's JSON."""
    import zoo

    results = data["results"]
    mappings = list(zoo.MAPPINGS)
    verdicts = list(zoo.VERDICTS)
    counts = Counter((r["mapping"], r["verdict"]) for r in results if not r["variant"])
    built = [r for r in results if not r["variant"] and r["verdict"] != "unbuildable"]
    exact = [r for r in built if r["verdict"] == "exact"]
    settings = data.get("settings", {})
    lines = [
        "# Coverage: every architecture of transformers' auto mappings",
        "",
        "<!-- generated by benchmarks/zoo_coverage.py from benchmarks/results/zoo_coverage.json: do not edit -->",
        "",
        "Each model class of transformers' auto mappings is built from its default config, shrunk (width 16, "
        f"{settings.get('layers', 2)} layers, vocabulary {settings.get('vocab_size', 64)}, no dropout), in float64 "
        "with eager attention, and trained one plain-SGD `FAMTrainer` step "
        f'(`fam_lambda={settings.get("fam_lambda")}`, `fam_gradient="{settings.get("fam_gradient")}"`, every row) '
        "on a small labelled batch. The step is compared with the brute force of the model's own loss (its Hessian in "
        "the head's weight through `torch.func.functional_call`, nothing fam_hf assumes): **exact** (every "
        f"parameter's update and the logged `relative_flatness` within {settings.get('tolerance')} relative, "
        f"{settings.get('float32_loss_tolerance')} where the model computes its loss in float32), "
        "**refused** (fam_hf raised its own error), **wrong** (trained, and differs: a silent wrong), **crashed** "
        "(another error while the plain Trainer trains), **unbuildable** (the zoo could not build it, or it does not "
        "train without FAM). The harness is `tests/zoo.py`; `tests/test_zoo.py` runs a sample in the default suite and "
        "the whole sweep with `-m slow`.",
        "",
        _provenance_sentence(data, results),
        "",
        *_certificate_sentence(settings),
        f"**{len(exact)} of {len(built)} built architectures exact ({100 * len(exact) / max(len(built), 1):.1f}%)**, "
        f"{sum(r['verdict'] == 'wrong' for r in results)} silently wrong (variants included).",
        "",
        "| Mapping | " + " | ".join(verdicts) + " | total |",
        "|---|" + "---:|" * (len(verdicts) + 1),
    ]
    for mapping in mappings:
        row = [counts[(mapping, v)] for v in verdicts]
        lines.append(f"| {mapping} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    totals = [sum(counts[(m, v)] for m in mappings) for v in verdicts]
    lines.append("| **all** | " + " | ".join(f"**{t}**" for t in totals) + f" | **{sum(totals)}** |")

    variants = [r for r in results if r["variant"]]
    if variants:
        lines += ["", "## The named settings", "", "| Architecture | Setting | Verdict | Reason |", "|---|---|---|---|"]
        lines += [
            f"| {r['class_name']} | {zoo.VARIANTS.get(r['variant'], r['variant'])} | {r['verdict']} | "
            f"{_cell(r.get('reason', ''))} |"
            for r in variants
        ]
    for verdict, title in (("wrong", "Silently wrong"), ("crashed", "Crashed")):
        chosen = [r for r in results if r["verdict"] == verdict]
        if chosen:
            lines += ["", f"## {title} ({len(chosen)})", ""]
            lines += [f"- {r['case']}: {r.get('reason', '')}" for r in chosen]
    for verdict, title in (("refused", "Refusals by reason"), ("unbuildable", "Unbuildable, by reason")):
        groups = defaultdict(list)
        for r in results:
            if r["verdict"] == verdict:
                groups[reason_group(r.get("reason", ""))].append(r["case"])
        if groups:
            lines += ["", f"## {title} ({sum(map(len, groups.values()))})", ""]
            for reason, names in sorted(groups.items(), key=lambda item: -len(item[1])):
                lines.append(f"- **{len(names)}**: {_cell(reason)}  \n  {', '.join(names)}")
    lines += ["", "## Every architecture", "", "| Architecture | Mapping | Verdict | Reason |", "|---|---|---|---|"]
    for r in results:
        name = r["class_name"] + (f" ({r['variant']})" if r["variant"] else "")
        reason = r.get("reason", "") if r["verdict"] != "exact" else ""
        lines.append(f"| {name} | {r['mapping']} | {r['verdict']} | {_cell(reason)} |")
    return "\n".join(lines) + "\n"


def _certificate_sentence(settings: dict) -> list[str]:
    """Say how much of each batch the certificate saw, where the sweep bounded it below the zoo's batches."""
    positions = settings.get("certificate_positions")
    if not positions or positions >= settings.get("batch", 4) * settings.get("sequence", 8):
        return []
    return [
        f"The certificate saw at most {positions} input positions of each batch (`FAM_HF_CERTIFICATE_POSITIONS="
        f"{positions}`), so every text batch was certified on a cut of it (2 examples, each cut to a window), and "
        "the step trained on the whole batch: the part must show whatever the whole batch shows.",
        "",
    ]


def _provenance_sentence(data: dict, results: list[dict]) -> str:
    """Say when and at which versions each mapping was swept (mappings swept together share a clause)."""
    groups = defaultdict(list)
    for mapping, prov in _swept(data).items():
        key = tuple(prov.get(k) for k in VERSIONS) + (prov.get("complete", True),)
        groups[key].append(mapping)
    clauses = []
    for (date, transformers, torch, commit, modified, complete), mappings in groups.items():
        which = "" if len(groups) == 1 else " (" + ", ".join(mappings) + ")"
        clauses.append(
            f"swept {date or '?'} with transformers {transformers}, torch {torch}, fam_hf at `{commit}`"
            + (" with uncommitted changes" if modified else "")
            + ("" if complete else " (**incomplete**)")
            + which
        )
    sentence = "; ".join(clauses)
    notes = "".join(f" {note}" for note in data.get("notes", []))
    return (
        sentence[0].upper()
        + sentence[1:]
        + f"; {len(results)} cases in {data.get('sweep_seconds', 0) / 60:.0f} minutes of sweeping."
        + notes
    )


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")[:400]


def merge(paths: list[Path]) -> dict:
    """Return one sweep from several (shards): the first header, every result once, in the sweep's order."""
    datas = [json.loads(p.read_text()) for p in paths]
    by_id = {r["case"]: r for d in datas for r in d["results"]}
    order = [c.id for c in all_cases()]
    merged = {k: v for k, v in datas[0].items() if k != "results"}
    merged["sweep_seconds"] = sum(d.get("sweep_seconds", 0) for d in datas)
    if any("swept" in d for d in datas):  # shards of --mappings sweeps: each mapping's provenance from its shards
        merged["swept"] = {m: p for d in datas if "swept" in d for m, p in _swept(d).items()}
    merged["notes"] = [note for d in datas for note in d.get("notes", [])]  # e.g. cases rerun at a later commit
    merged["complete"] = all(d.get("complete", False) for d in datas) and set(order) <= set(by_id)
    merged["results"] = [by_id[i] for i in order if i in by_id] + [r for i, r in by_id.items() if i not in order]
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", help="i/n: run every n-th case from the i-th (1-based)")
    parser.add_argument("--only", help="a regular expression over case ids")
    parser.add_argument("--gradient", default="full", choices=["full", "head"], help="fam_gradient of the step")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write, after every case")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the coverage table to write at the end")
    parser.add_argument("--resume", action="store_true", help="keep the results --out already has")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds per case")
    parser.add_argument("--render", nargs="*", type=Path, help="merge these JSONs into --out and render --docs")
    parser.add_argument("--mappings", help="comma-separated mappings to sweep, merged into --out's other mappings")
    parser.add_argument("--commit", help="the fam_hf commit to record, when fam_hf is imported from elsewhere")
    args = parser.parse_args(argv)
    sys.path.append(str(TESTS))
    if args.render is not None:
        data = merge(args.render or [args.out])
        write_json(args.out, {k: v for k, v in data.items() if k != "results"}, data["results"])
        args.docs.write_text(render(data))
        print(f"wrote {args.out} and {args.docs}")
        return
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    mappings = args.mappings.split(",") if args.mappings else None
    cases = all_cases(args.only, shard, mappings)
    keep = json.loads(args.out.read_text()) if mappings and args.out.exists() else None
    sweep(cases, args.out, args.gradient, args.resume, args.time_limit, args.commit, keep)
    if shard is None and (args.only is None or mappings):
        args.docs.write_text(render(json.loads(args.out.read_text())))
        print(f"wrote {args.out} and {args.docs}")


if __name__ == "__main__":
    main()

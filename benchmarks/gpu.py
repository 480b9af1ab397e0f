"""The CUDA tests and the published memory/time comparison, in one command.

    PYTHONPATH=. python benchmarks/gpu.py --out DIR [--cpu] [--steps 20] [--warmup 3] [--cases NAME ...]
                                          [--skip-tests] [--benchmarks docs/BENCHMARKS.md | --no-append]

1. Runs `pytest -m cuda tests/test_cuda.py` in a subprocess (JUnit XML and log in DIR).
2. In this process, per case (random init from the shipped configs, synthetic tokens, AdamW):
   Pythia-70M 8 x 512 and Mamba-130M 2 x 256 under fp16 AMP with a grad scaler, and a 1B-class
   Llama shape (hidden 2048, vocab 128,256, 4 layers, 1 x 4096) under bf16 autocast; modes
   conventional, HF checkpointing, HF checkpointing + fused loss, bwsk reversible (default plan)
   and bwsk reversible with a budget. Per mode: peak `torch.cuda.max_memory_allocated` and median
   step time over the timed steps after warm-up, each as a ratio to conventional from this run.
3. Per mode, the whole-step peak estimate of one more step (`hf_bwsk.memory.measure.step_peak`,
   the tracker that runs on CPU) against the CUDA peak of the same shapes.
4. Writes DIR/gpu_benchmark.json, prints the targets with pass/fail, and appends the rows to
   docs/BENCHMARKS.md (device, versions, commit, date).

`--cpu` runs the same logic on the CPU at small shapes (2-layer configs, a few steps), the peak
being the whole-step tracker's: for tests and CI, not for publishing. Exit status: 0 when the tests
passed and every mode ran (the targets are reported, not enforced), 1 otherwise.

Needs only torch, transformers, accelerate, safetensors, peft and pytest (no datasets, evaluate or
matplotlib, no Hub access); run it from the repository root with the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from xml.etree import ElementTree

import torch
from gpu_step import MODES, Case, measure_mode, release
from memory import SEED
from provenance import ROOT, append_to_section, provenance

BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## CUDA comparison (`benchmarks/gpu.py`)"
_MB = 2**20
# The issue's targets, as ratios to conventional from the same run.
TARGETS = {
    "pythia-70m": {"peak_ratio": 0.40, "step_ratio": 1.10},
    "mamba-130m": {"peak_ratio": 0.55, "step_ratio": 1.15},
}
BASELINE_FOR_1B = "hf_checkpointing_fused_loss"
CASE_NAMES = ("pythia-70m", "mamba-130m", "llama-1b-class")


def _shipped(name: str, **overrides):
    def config():
        from hf_bwsk.models import load_config

        loaded = load_config(name)
        for key, value in overrides.items():
            setattr(loaded, key, value)
        return loaded

    return config


def _llama(hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, layers: int, positions: int):
    def config():
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, vocab_size=vocab, num_hidden_layers=layers,
                           max_position_embeddings=positions, tie_word_embeddings=True)

    return config


def cases(cpu: bool) -> list[Case]:
    """The published shapes; with ``cpu`` the same configs at toy widths, in fp32.

    Autocast in fp16/bf16 is emulated on a CPU without half-precision units (~25 s for a step of a
    toy model), so the CPU check runs fp32 (the grad scaler off); the modes' logic is the same.
    """
    if cpu:
        toy = {"num_hidden_layers": 2, "vocab_size": 1024, "hidden_size": 64}
        return [
            Case("pythia-70m", _shipped("pythia-70m", **toy, intermediate_size=256, num_attention_heads=4), 2, 64,
                 "fp32"),
            Case("mamba-130m", _shipped("mamba-130m", **toy, intermediate_size=128, time_step_rank=4), 1, 16, "fp32"),
            Case("llama-1b-class", _llama(64, 256, 4, 2, 1024, 2, 256), 1, 128, "fp32"),
        ]
    return [
        Case("pythia-70m", _shipped("pythia-70m"), 8, 512, "fp16"),
        Case("mamba-130m", _shipped("mamba-130m"), 2, 256, "fp16"),
        # Llama-3.2-1B's widths and vocabulary, 4 of its 16 layers: the head dominates as at full depth.
        Case("llama-1b-class", _llama(2048, 8192, 32, 8, 128_256, 4, 4096), 1, 4096, "bf16",
             notes={"layers": "4 of Llama-3.2-1B's 16"}),
    ]


def run_cuda_tests(out: Path) -> dict:
    """`pytest -m cuda` on the CUDA test file, in a subprocess; counts read from its JUnit XML."""
    junit = out / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", str(ROOT / "tests" / "test_cuda.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "cuda_tests.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    print(result.stdout[-3000:], flush=True)
    if not junit.exists():  # pytest did not start (not installed, bad arguments): one error, see the log
        return {"returncode": result.returncode, "tests": 0, "failures": 0, "errors": 1, "skipped": 0, "passed": 0,
                "log": "cuda_tests.log", "junit": None}
    suite = ElementTree.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"returncode": result.returncode, **counts, "log": "cuda_tests.log", "junit": junit.name}


def measure_case(case: Case, device: torch.device, warmup: int, steps: int) -> dict:
    """Every mode of `case`, fresh model each; a failing mode is recorded (with its error) and skipped."""
    rows, budget = [], None
    for mode in MODES:
        if mode == "bwsk_reversible_budget":
            budget = _halfway_budget(rows)
            if budget is None:
                rows.append({"mode": mode, "error": "no active default plan to derive a peak budget from"})
                continue
        try:
            rows.append(measure_mode(case, mode, device, warmup, steps, budget))
        except Exception as error:  # noqa: BLE001 - recorded in the results and the exit status
            traceback.print_exc()
            rows.append({"mode": mode, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
        release(device)  # outside `except`: the traceback's frames still hold that mode's model there
        print(json.dumps({"case": case.name, **rows[-1]}), flush=True)
    return {"model": case.name, "batch_size": case.batch_size, "seq_len": case.seq_len,
            "precision": case.precision, **case.notes, "modes": with_ratios(rows)}


def _halfway_budget(rows: list[dict]) -> int | None:
    """The budget mode's whole-step peak budget: halfway between the predicted peaks of recomputing
    everything and of the default plan."""
    default = next((row for row in rows if row["mode"] == "bwsk_reversible" and "predicted_bytes" in row), None)
    if default is None:
        return None
    status = default["reversible"]
    return (status["minimum_peak_bytes"] + status["predicted_peak_bytes"]) // 2


def with_ratios(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        if "error" in row or "error" in base:
            continue
        row["loss_abs_diff"] = abs(row["first_loss"] - base["first_loss"])
        row["peak_ratio"] = row["peak_bytes"] / base["peak_bytes"]
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["peak_over_estimate"] = row["peak_bytes"] / row["estimate_bytes"]
    return rows


def check_targets(case_result: dict) -> list[dict]:
    """The issue's targets for this case, each bwsk mode checked, with pass/fail."""
    rows = {row["mode"]: row for row in case_result["modes"] if "error" not in row}
    checks, baseline = [], rows.get(BASELINE_FOR_1B)
    for mode in ("bwsk_reversible", "bwsk_reversible_budget"):
        row = rows.get(mode)
        if case_result["model"] in TARGETS:
            target = TARGETS[case_result["model"]]
            wanted = f"peak <= {target['peak_ratio']}x and step <= {target['step_ratio']}x conventional"
            passed = bool(row and "peak_ratio" in row and row["peak_ratio"] <= target["peak_ratio"]
                          and row["step_ratio"] <= target["step_ratio"])
        else:
            wanted = f"peak <= {BASELINE_FOR_1B}'s and a shorter step"
            passed = bool(row and baseline and row["peak_bytes"] <= baseline["peak_bytes"]
                          and row["step_s"] < baseline["step_s"])
        got = "not measured"
        if row and "peak_ratio" in row:
            got = f"peak {row['peak_ratio']:.3f}x, step {row['step_ratio']:.3f}x conventional"
            if case_result["model"] not in TARGETS and baseline:
                got += (f"; peak {row['peak_bytes'] / baseline['peak_bytes']:.3f}x, "
                        f"step {row['step_s'] / baseline['step_s']:.3f}x {BASELINE_FOR_1B}")
        checks.append({"model": case_result["model"], "mode": mode, "target": wanted, "got": got, "passed": passed})
    return checks


def _cell(row: dict, key: str, spec: str, scale: float = 1.0) -> str:
    return format(row[key] / scale, spec) if key in row else "-"


def table_lines(results: dict) -> list[str]:
    versions = results["versions"]
    tests = results["cuda_tests"]
    test_line = ("CUDA tests: not run" if tests is None else
                 f"CUDA tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                 f"{tests['skipped']} skipped")
    lines = [
        f"### {results['date']}, commit {results['commit']}" + (" (--cpu: logic check, not a result)"
                                                                 if results["cpu"] else ""),
        "",
        f"Device: {results['device']}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"accelerate {versions['accelerate']}; {results['warmup']} warm-up + {results['steps']} timed steps "
        f"(median); seed {results['seed']}. {test_line}.",
        "",
        "| model | batch x seq | precision | mode | peak MB | peak x | step ms | step x | estimate MB "
        "| peak / estimate | predicted MB | loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        for row in case["modes"]:
            prefix = f"| {case['model']} | {case['batch_size']} x {case['seq_len']} | {case['precision']} | {row['mode']} |"
            if "error" in row:
                lines.append(f"{prefix} failed: {row['error']} ||||||||")
                continue
            lines.append(
                f"{prefix} {row['peak_bytes'] / _MB:.1f} | {_cell(row, 'peak_ratio', '.3f')} "
                f"| {row['step_s'] * 1000:.1f} | {_cell(row, 'step_ratio', '.3f')} | {row['estimate_bytes'] / _MB:.1f} "
                f"| {_cell(row, 'peak_over_estimate', '.3f')} | {_cell(row, 'predicted_bytes', '.1f', _MB)} "
                f"| {_cell(row, 'loss_abs_diff', '.1e')} |"
            )
    lines += ["", "Targets (ratios to conventional, same run):", ""]
    lines += [f"- {check['model']} {check['mode']}: {check['target']}: {check['got']} -> "
              f"{'PASS' if check['passed'] else 'FAIL'}" for check in results["targets"]]
    return lines


def append_table(results: dict, path: Path) -> None:
    """Add this run's table at the end of the benchmark's section of `path` (earlier runs stay)."""
    intro = (
        "peak: `torch.cuda.max_memory_allocated` over the timed steps (with `--cpu`: the whole-step tracker's). "
        "estimate: the whole-step peak tracker (`step_peak`, the CPU estimate) on one more step of the same "
        "shapes. predicted: the bwsk plan's own peak prediction, made before the first step. "
        "bwsk_reversible_budget's budget: halfway between the predicted peaks of recomputing everything and of "
        "the default plan. loss diff: first-step loss against conventional."
    )
    append_to_section(SECTION, intro, table_lines(results), path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_benchmark.json and the test log")
    parser.add_argument("--cpu", action="store_true", help="run the logic on the CPU at small shapes (a check)")
    parser.add_argument("--steps", type=int, help="timed steps per mode (default: 20, or 2 with --cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3, or 1 with --cpu)")
    parser.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=list(CASE_NAMES),
                        help="which models to compare (default: all; each run appends its own table)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m cuda` first")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS, help="the Markdown file to append rows to")
    parser.add_argument("--no-append", action="store_true", help="leave the Markdown file alone")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a CUDA machine, or pass --cpu to check the logic at small shapes")
    args.steps = args.steps or (2 if args.cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)  # toy shapes gain nothing from threads; OpenMP spin-waiting costs 5x on busy CPUs
    tests = None if args.skip_tests else run_cuda_tests(args.out)
    chosen = [case for case in cases(args.cpu) if case.name in args.cases]
    case_results = [measure_case(case, device, args.warmup, args.steps) for case in chosen]
    results = {"benchmark": "gpu", **provenance(), "cpu": args.cpu, "warmup": args.warmup, "steps": args.steps,
               "seed": SEED, "cuda_tests": tests, "cases": case_results,
               "targets": [check for case in case_results for check in check_targets(case)]}
    (args.out / "gpu_benchmark.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for check in results["targets"]:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['model']} {check['mode']}: {check['target']}: "
              f"{check['got']}")
    if not args.no_append:
        append_table(results, args.benchmarks)
    failed_modes = [row for case in case_results for row in case["modes"] if "error" in row]
    return int(bool(failed_modes) or (tests is not None and tests["returncode"] != 0))


if __name__ == "__main__":
    sys.exit(main())

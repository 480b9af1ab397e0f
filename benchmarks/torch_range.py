"""`benchmarks/overhead.py` under several torch releases on one machine, in one run, as ratios to one of them.

Each interpreter (a virtual environment with another torch) runs overhead.py in turn, twice round
so drift hits every release alike; per release: the reversible mode's median step time, its ratio to
HF checkpointing in the same process, and both as ratios to the reference release's (the target:
within 1.05x; the second takes out a release's overall speed on this CPU). Prints JSON and appends a table to docs/BENCHMARKS.md.

    python benchmarks/torch_range.py --python /venv-211/bin/python --python /venv-214/bin/python \\
        --reference /venv-213/bin/python [--rounds 2] [--steps 200] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess

from provenance import ROOT, append_to_section, provenance

SECTION = "## The reversible mode across torch releases (`benchmarks/torch_range.py`)"
INTRO = ("`benchmarks/overhead.py` (tiny GPT-NeoX, 1 thread) run by one interpreter per torch release in turn, on one "
         "machine in one run; the reversible step time as a ratio to the reference release's.")


def overhead_run(python: str, steps: int) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([python, str(ROOT / "benchmarks" / "overhead.py"), "--steps", str(steps), "--no-append"],
                            cwd=ROOT, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout[result.stdout.index("{"):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", required=True, help="an interpreter with another torch")
    parser.add_argument("--reference", required=True, help="the interpreter whose torch the others are compared to")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    interpreters = [args.reference, *args.python]
    runs: dict[str, list[dict]] = {python: [] for python in interpreters}
    for _ in range(args.rounds):
        for python in interpreters:
            runs[python].append(overhead_run(python, args.steps))
    rows = []
    for python in interpreters:
        found = runs[python]
        rows.append({
            "python": python,
            "torch": found[0]["versions"]["torch"],
            "transformers": found[0]["versions"]["transformers"],
            "execution": found[0]["execution"],
            "reversible_ms": statistics.median(run["median_step_ms"]["bwsk_reversible"] for run in found),
            "hf_checkpointing_ms": statistics.median(run["median_step_ms"]["hf_checkpointing"] for run in found),
            "x_hf_checkpointing": {mode: statistics.median(run["ratio_to_hf_checkpointing"][mode] for run in found)
                                   for mode in found[0]["ratio_to_hf_checkpointing"]},
            "max_loss_diff_to_conventional": max(run["max_loss_diff_to_conventional"] for run in found),
        })
    reference = rows[0]
    for row in rows:
        row["reversible_x_reference"] = row["reversible_ms"] / reference["reversible_ms"]
        # The mode's own cost, the release's overall speed taken out (CUDA builds run the CPU slower).
        row["overhead_x_reference"] = (row["x_hf_checkpointing"]["bwsk_reversible"]
                                       / reference["x_hf_checkpointing"]["bwsk_reversible"])
    result = {"rounds": args.rounds, "steps": args.steps, "reference_torch": rows[0]["torch"], "rows": rows,
              **provenance()}
    print(json.dumps(result, indent=2))
    if not args.no_append:
        append(result)


def append(result: dict) -> None:
    lines = [
        f"\n### {result['date']}, commit {result['commit']}\n",
        f"Device: {result['device']}; {result['rounds']} rounds of {result['steps']} interleaved steps per release; "
        f"reference torch {result['reference_torch']}.\n",
        "| torch | transformers | execution | reversible ms | HF checkpointing ms | conventional x HF ckpt "
        "| fused loss x HF ckpt | reversible x HF ckpt | per-op x HF ckpt | reversible ms x reference "
        "| reversible x HF ckpt, x reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ratios = row["x_hf_checkpointing"]
        lines.append(f"| {row['torch']} | {row['transformers']} | {row['execution']} | {row['reversible_ms']:.2f} | "
                     f"{row['hf_checkpointing_ms']:.2f} | {ratios['conventional']:.3f} | "
                     f"{ratios['hf_checkpointing_fused_loss']:.3f} | {ratios['bwsk_reversible']:.3f} | "
                     f"{ratios['bwsk_reversible_per_op']:.3f} | {row['reversible_x_reference']:.3f} | "
                     f"{row['overhead_x_reference']:.3f} |")
    append_to_section(SECTION, INTRO, lines)


if __name__ == "__main__":
    main()

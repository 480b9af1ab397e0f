"""How long the op-level S/K analysis and the CALM report take on the built-in Pythia-70M and
Mamba-130M configs (meta device, default batch 2 x sequence 128), and `hf-bwsk analyze` end to end.

Each model is measured in a fresh process: "cold" is the first `analyze()` call after the imports
(it includes building the model on meta and importing its modeling code), "warm" the median of
three further calls; wall and process CPU time both, with the load average, since on a shared
machine wall time also measures the neighbours. The command (`python -m hf_bwsk.cli analyze NAME`:
op table, module view, CALM table with the sharding plan) is timed as a user runs it, start-up
included, median of three each way: cold (a fresh, empty analysis cache each time: imports and
trace) and cached (the same command again, answered from the cache without torch), next to the
bare imports a cold run cannot avoid (torch, transformers' modeling code). The caches live in a
temporary directory, removed afterwards. Prints one JSON object and appends rows to
docs/BENCHMARKS.md.

    python benchmarks/analysis_speed.py [--models pythia-70m mamba-130m] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, provenance

BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Analysis speed (`benchmarks/analysis_speed.py`)"
HEADER = (
    "| date | commit | device | torch | transformers | model | batch x seq | data-path ops | all ops "
    "| cold analyze s (CPU s) | warm analyze s (CPU s) | CALM s | load avg |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
WARM_REPEATS = 3
CLI_SECTION = "## `hf-bwsk analyze` end to end (`benchmarks/analysis_speed.py`)"
CLI_HEADER = (
    "| date | commit | device | model | cold command s (CPU s) | cached command s (CPU s) "
    "| imports alone s (CPU s) | target s | load avg before / after |\n|---|---|---|---|---|---|---|---|---|"
)
CLI_TARGETS = {"pythia-70m": 2.0, "mamba-130m": 5.0}
IMPORTS = "import hf_bwsk.cli, hf_bwsk.analysis.analyzer, transformers.modeling_utils"


def measure(name: str) -> dict:
    """Time the analysis of one built-in model in this process (call in a fresh one)."""
    from hf_bwsk.analysis import analyze, calm_report
    from hf_bwsk.models import load_config

    config = load_config(name)
    (cold, cold_cpu), report = timed(analyze, config)
    warm = [timed(analyze, config)[0] for _ in range(WARM_REPEATS)]
    (calm_s, _), calm = timed(calm_report, config)
    return {
        "model": name,
        "batch_size": report.batch_size,
        "seq_len": report.seq_len,
        "data_path_ops": len(report.data_records),
        "all_ops": len(report.records),
        "cold_s": round(cold, 3),
        "cold_cpu_s": round(cold_cpu, 3),
        "warm_median_s": round(statistics.median(wall for wall, _ in warm), 3),
        "warm_median_cpu_s": round(statistics.median(cpu for _, cpu in warm), 3),
        "calm_s": round(calm_s, 3),
        "ratios": {by: {kind: round(share, 4) for kind, share in report.ratios(by).items()}
                   for by in ("count", "bytes", "flops")},
        "module_view": report.module_view.counts(),
        "logical_ops": len(report.logical_records),
        "sequence_loops": len(report.sequence_loops()),
        "calm_sync_counts_upper_bound": calm.sync_counts(),
        "calm_layer_sync_counts": {axis: sorted(set(axis_report.layer_sync_counts.values()))
                                   for axis, axis_report in calm.axes.items()},
        "hidden_plan_collectives_per_layer": sorted(set(calm.hidden_plan.layer_collectives().values())),
        "hidden_plan_collectives_total": calm.hidden_plan.total(),
        "calm_probe": {"batch": calm.batch_size, "seq_len": calm.seq_len},
    }


def timed(function, *args):
    """((wall seconds, process CPU seconds), result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def timed_child(command: list[str], cache: Path | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one subprocess run (its analysis cache: ``cache``)."""
    env = {**os.environ, "HF_BWSK_CACHE": str(cache)} if cache is not None else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, env=env)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return round(statistics.median(wall for wall, _ in runs), 2), round(statistics.median(cpu for _, cpu in runs), 2)


def measure_cli(name: str) -> dict:
    """`hf-bwsk analyze NAME` as a user runs it, cold (empty cache) and cached, and the imports
    alone, median of three each."""
    load_before = round(os.getloadavg()[0], 1)
    command = [sys.executable, "-m", "hf_bwsk.cli", "analyze", name]
    with tempfile.TemporaryDirectory(prefix="hf_bwsk_analysis_cache_") as root:
        caches = [Path(root) / f"cold{run}" for run in range(WARM_REPEATS)]
        cold = [timed_child(command, cache) for cache in caches]  # each into an empty cache
        cached = [timed_child(command, caches[0]) for _ in range(WARM_REPEATS)]
    imports = [timed_child([sys.executable, "-c", IMPORTS]) for _ in range(WARM_REPEATS)]
    return {
        "model": name,
        "command_s": median_pair(cold),
        "cached_command_s": median_pair(cached),
        "imports_s": median_pair(imports),
        "target_s": CLI_TARGETS.get(name),
        "load_average": [load_before, round(os.getloadavg()[0], 1)],
    }


def append_cli_rows(results: dict) -> None:
    rows = [
        f"| {results['date']} | {results['commit']} | {results['device']} | {m['model']} "
        f"| {m['command_s'][0]:.2f} ({m['command_s'][1]:.2f}) "
        f"| {m['cached_command_s'][0]:.2f} ({m['cached_command_s'][1]:.2f}) "
        f"| {m['imports_s'][0]:.2f} ({m['imports_s'][1]:.2f}) "
        f"| {m['target_s']} | {m['load_average'][0]} / {m['load_average'][1]} |"
        for m in results["cli"]
    ]
    insert_rows(CLI_SECTION, "`hf-bwsk analyze NAME` at its defaults, wall (CPU) seconds, median of three: cold "
                "(empty analysis cache) and cached (the repeated command).",
                CLI_HEADER, rows)


def insert_rows(section: str, intro: str, header: str, rows: list[str]) -> None:
    """Add rows at the end of a section's table in docs/BENCHMARKS.md (the section made if new).

    The table is the section's last one with this ``header``; when the section only holds tables
    with other columns (an older layout), a new table with ``intro`` and ``header`` starts at its end.
    """
    text = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if section not in lines:
        lines += ["", section, "", intro, "", *header.split("\n")]
    start = lines.index(section) + 1
    stop = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    title = header.split("\n")[0]
    tables = [i for i in range(start, stop) if lines[i] == title]
    if not tables:
        while stop > start and not lines[stop - 1].strip():
            stop -= 1
        lines[stop:stop] = ["", intro, "", *header.split("\n")]
        tables = [stop + 3]
    end = tables[-1]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[end:end] = rows
    BENCHMARKS.write_text("\n".join(lines) + "\n", encoding="utf-8")


def append_rows(results: dict) -> None:
    """Add one row per model under this benchmark's section of docs/BENCHMARKS.md."""
    versions = results["versions"]
    rows = [
        f"| {results['date']} | {results['commit']} | {results['device']} | {versions['torch']} "
        f"| {versions['transformers']} | {m['model']} | {m['batch_size']} x {m['seq_len']} | {m['data_path_ops']} "
        f"| {m['all_ops']} | {m['cold_s']:.2f} ({m['cold_cpu_s']:.2f}) | {m['warm_median_s']:.2f} "
        f"({m['warm_median_cpu_s']:.2f}) | {m['calm_s']:.2f} | {results['load_average']} |"
        for m in results["models"]
    ]
    insert_rows(SECTION, "Default shape (batch 2 x sequence 128) on the meta device.", HEADER, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pythia-70m", "mamba-130m"])
    parser.add_argument("--no-append", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return

    models = []
    for name in args.models:
        child = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        models.append(json.loads(child.stdout.strip().splitlines()[-1]))
    results = {
        "benchmark": "analysis_speed",
        **provenance(),
        "warm_repeats": WARM_REPEATS,
        # The machine may be shared: the 1-minute load average tells how contended the wall times were.
        "load_average": round(os.getloadavg()[0], 1),
        "models": models,
        "cli": [measure_cli(name) for name in args.models],
    }
    print(json.dumps(results, indent=2))
    if not args.no_append:
        append_rows(results)
        append_cli_rows(results)


if __name__ == "__main__":
    main()

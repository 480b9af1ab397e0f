"""Tables and curves of `pareto.py`'s results: rows appended to docs/BENCHMARKS.md, a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path

from provenance import append_to_section

_MB = 2**20


def with_ratios(result: dict) -> dict:
    """Each row's figures as ratios to conventional from the same run, and whether a bwsk plan dominates it."""
    rows = result["rows"]
    base = next(row for row in rows if row["mode"] == "conventional")
    for row in rows:
        # torch.compile rows have no whole-step peak (its kernels run outside the dispatcher).
        row["peak_x"] = row["peak"]["peak_bytes"] / base["peak"]["peak_bytes"] if row["peak"] else None
        row["kept_x"] = row["kept_bytes"] / base["kept_bytes"]
        row["flops_x"] = row["train_flops"] / base["train_flops"]
        row["loss_abs_diff"] = abs(row["loss"] - base["loss"])
    bwsk = [row for row in rows if row["mode"].startswith("bwsk")]
    for row in rows:
        if not row["mode"].startswith("bwsk"):
            row["matched_by_bwsk"] = any(
                plan["kept_bytes"] <= row["kept_bytes"] and plan["train_flops"] <= row["train_flops"] for plan in bwsk)
    return result


def table(result: dict, first: dict) -> list[str]:
    shape = f"{result['batch_size']} x {result['seq_len']}"
    lines = [f"#### {result['shape']} {shape}", ""]
    if result["commit"] != first["commit"]:  # shapes measured in separate runs say which code they measured
        lines += [f"Measured {result['date']} at commit {result['commit']}.", ""]
    lines += [
        "| mode | peak MB | peak x | state MB at peak | activations MB at peak | peak in | kept MB | kept x "
        "| FLOPs x | CPU step s (noisy) | loss diff | bwsk plan keeps <= at FLOPs <= |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        matched = {True: "yes", False: "no"}.get(row.get("matched_by_bwsk"), "")
        lines.append(
            f"| {row['mode']} | {_peak_cells(row)} | {row['kept_bytes'] / _MB:.1f} "
            f"| {row['kept_x']:.3f} | {row['flops_x']:.3f} | {row['cpu_step_s_noisy']:.1f} "
            f"| {row['loss_abs_diff']:.1e} | {matched} |"
        )
    return lines


def _peak_cells(row: dict) -> str:
    """Peak MB, peak x, state and activations at the peak, and where it fell ("-" where not measured)."""
    peak = row["peak"]
    if peak is None:
        return "- | - | - | - | -"
    state = peak["weight_bytes"] + peak["grad_bytes"] + peak["optimizer_bytes"]
    return (f"{peak['peak_bytes'] / _MB:.0f} | {row['peak_x']:.3f} | {state / _MB:.0f} "
            f"| {peak['activation_bytes'] / _MB:.0f} | {peak['phase']}")


def append_tables(results: list[dict], benchmarks: Path, section: str) -> None:
    first = results[0]
    versions = first["versions"]
    lines = [
        f"### {first['date']}, commit {first['commit']}",
        "",
        f"Device: {first['device']}; torch {versions['torch']}, transformers {versions['transformers']}; fp32; "
        f"{first['threads']} CPU thread(s); one measured step per mode (fused AdamW, `Trainer`'s default, its "
        "moments created beforehand); seed 0.",
        "",
    ]
    for result in results:
        lines += table(result, first) + [""]
    intro = (
        "peak: whole-step peak, the most bytes alive at once over forward, backward and the "
        "AdamW step (weights, grads, optimizer state, activations, transients; `hf_bwsk.memory.step_peak`, "
        "what `torch.cuda.max_memory_allocated` reports less allocator slack), split at the peak into "
        "training state and activations/transients. kept: bytes the forward leaves alive for backward "
        "(activations only: the fused loss' head-weight gradient, the `.grad` every mode allocates, apart). FLOPs: matmul/attention FLOPs of forward + "
        "backward, recompute included. x: ratio to conventional in the same run. CPU step time: of the "
        "tracked step on shared cores, noisy. Last column: whether some bwsk plan of the same run keeps no "
        "more bytes at no more FLOPs than that baseline. `torch_compile_budget_B`: `torch.compile` with "
        "`activation_memory_budget=B`, kept bytes and FLOPs read off its partition (`benchmarks/compile_budget.py`; "
        "no whole-step peak: inductor's kernels run outside the dispatcher the tracker watches). "
        "The Llama shape has one decoder layer: its layers' "
        "bytes and FLOPs scale linearly with the layer count (x16 for Llama-3.2-1B), the embeddings, head "
        "and loss do not."
    )
    append_to_section(section, intro, lines, benchmarks)


def plot(results: list[dict], png: str) -> None:
    """Peak and kept bytes against FLOPs, one panel pair per shape; bwsk plans as a line, baselines as points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(results), 8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(results), squeeze=False)
    for column, result in enumerate(results):
        for row_index, (key, label) in enumerate((("peak_x", "whole-step peak"), ("kept_x", "kept for backward"))):
            ax = axes[row_index][column]
            bwsk = sorted((r for r in result["rows"] if r["mode"].startswith("bwsk")), key=lambda r: r["flops_x"])
            ax.plot([r["flops_x"] for r in bwsk], [r[key] for r in bwsk], "o-", color="tab:blue", label="bwsk plans")
            for r in result["rows"]:
                if not r["mode"].startswith("bwsk") and r[key] is not None:
                    ax.plot(r["flops_x"], r[key], "s", label=r["mode"])
            ax.set_xlabel("FLOPs (x conventional)")
            ax.set_ylabel(f"{label} (x conventional)")
            ax.set_title(f"{result['shape']} {result['batch_size']} x {result['seq_len']}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    figure.savefig(png, dpi=110)


def report(paths: list[str], png: str, benchmarks: Path, section: str) -> None:
    results = [with_ratios(json.loads(Path(path).read_text(encoding="utf-8"))) for path in paths]
    print(json.dumps([{"shape": r["shape"], "rows": [
        {k: row.get(k) for k in ("mode", "peak_x", "kept_x", "flops_x", "matched_by_bwsk")} for row in r["rows"]]}
        for r in results], indent=1))
    append_tables(results, benchmarks, section)
    plot(results, png)

"""The grid's ``results.json`` and the tables the runner prints (the cards' layout).

Schema: ``docs/RESULTS_FORMAT.md``.
"""

from datetime import datetime, timezone

from ..formatting import fmt_memory, results_table, saved_fraction
from ..layout import EXPERIMENT_LABELS, EXPERIMENTS


def assemble_results(*, preset, model_name: str, hf_id: str | None, runs: list[dict], analysis: dict, params: int,
                     seed: int, device: str, versions: dict, dataset: dict, hyperparameters: dict) -> dict:
    """``results.json`` of one grid: the model, its S/K analysis, the runs and their provenance.

    ``hf_id`` is the Hub id of the fine-tune base, None when it came from a local directory;
    ``analysis`` is the S/K report summary (``SKReport.summary()``) the variants recorded.
    """
    ratios = analysis["ratios"]["count"]
    return {
        "model_name": model_name,
        "slug": preset.slug,
        "hf_id": hf_id,
        "arch_family": preset.arch_family,
        "params_m": round(params / 1e6, 3),
        "s_ratio": ratios["S"],
        "k_ratio": ratios["K"],
        "gray_ratio": ratios["Gray"],
        "analysis": analysis,
        "runs": runs,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "preset": preset.name,
        "device": device,
        "versions": versions,
        "dataset": dataset,
        "hyperparameters": hyperparameters,
    }


def memory_saving(runs: list[dict], experiment: str) -> float | None:
    """`saved_fraction` of one experiment's reversible run, if both it and the conventional one ran."""
    by_mode = {run["mode"]: run for run in runs if run["experiment"] == experiment}
    if "conventional" not in by_mode or "reversible" not in by_mode:
        return None
    return saved_fraction(by_mode["conventional"], by_mode["reversible"])


def format_tables(results: dict) -> str:
    """The results table per experiment and the reversible-vs-conventional memory saving, as on the cards."""
    lines = []
    for experiment in EXPERIMENTS:
        runs = [run for run in results["runs"] if run["experiment"] == experiment]
        if not runs:
            continue
        lines += [f"### {EXPERIMENT_LABELS[experiment]} ({results['model_name']}, preset {results['preset']})", ""]
        lines.append(results_table(runs))
        saving = memory_saving(results["runs"], experiment)
        if saving is not None:
            peaks = {run["mode"]: run["peak_memory_mb"] for run in runs}
            kind = runs[0].get("peak_memory_kind")
            lines += ["", f"Memory savings (reversible vs conventional): {fmt_memory(peaks['conventional'])} -> "
                          f"{fmt_memory(peaks['reversible'])} ({100 * saving:.1f}% saved, {kind})"]
        lines.append("")
    return "\n".join(lines)


def divergence_summary(runs: list[dict]) -> str | None:
    """One line naming every diverged variant and where, or None when none diverged."""
    diverged = [run for run in runs if run.get("diverged")]
    if not diverged:
        return None
    where = ", ".join(f"{run['variant']} at step {run['diverged']['step']} ({run['diverged']['metric']} "
                      f"{run['diverged']['value']})" for run in diverged)
    return (f"{len(diverged)} of {len(runs)} variants diverged: {where}; lower --learning_rate "
            "(--scratch_learning_rate for scratch) and rerun them with --overwrite_output_dir")

"""The grid's ``results.json`` and the tables the runner prints (the cards' layout).

Schema: ``docs/RESULTS_FORMAT.md``.
"""

import math
from datetime import datetime, timezone

from .run_dir import EXPERIMENT_LABELS, EXPERIMENTS, MODE_LABELS, MODES

TABLE_COLUMNS = ("Mode", "Final Loss", "Val PPL", "Test PPL", "Peak Memory", "Time", "Epochs")


def perplexity(mean_nll: float) -> float:
    """exp of a token-weighted mean negative log-likelihood (inf where exp overflows)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def assemble_results(*, preset, model_name: str, hf_id: str | None, runs: list[dict], analysis, params: int,
                     seed: int, device: str, versions: dict, dataset: dict, hyperparameters: dict) -> dict:
    """``results.json`` of one grid: the model, its S/K analysis, the runs and their provenance.

    ``hf_id`` is the Hub id of the fine-tune base, None when it came from a local directory.
    """
    ratios = analysis.ratios(by="count")
    return {
        "model_name": model_name,
        "slug": preset.slug,
        "hf_id": hf_id,
        "arch_family": preset.arch_family,
        "params_m": round(params / 1e6, 3),
        "s_ratio": ratios["S"],
        "k_ratio": ratios["K"],
        "gray_ratio": ratios["Gray"],
        "analysis": analysis.summary(),
        "runs": runs,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "preset": preset.name,
        "device": device,
        "versions": versions,
        "dataset": dataset,
        "hyperparameters": hyperparameters,
    }


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _memory(megabytes) -> str:
    if megabytes is None:
        return "n/a"
    return f"{megabytes / 1024:.2f} GB" if megabytes >= 1024 else f"{megabytes:.1f} MB"


def _duration(seconds) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _row(run: dict) -> list[str]:
    epochs = _number(run.get("epochs_completed"), "g") + (" (early stop)" if run.get("early_stopped") else "")
    return [
        MODE_LABELS[run["mode"]],
        _number(run.get("final_train_loss"), ".4f"),
        _number(run.get("best_val_metric"), ".2f"),
        _number(run.get("test_metric"), ".2f"),
        _memory(run.get("peak_memory_mb")),
        _duration(run.get("wall_time_s")),
        epochs,
    ]


def saved_fraction(conventional: dict, reversible: dict) -> float | None:
    """Fraction of peak memory the reversible run saved against the conventional one; None unless
    both were measured, the same way (a CUDA peak and CPU bytes kept are not comparable)."""
    before, after = conventional.get("peak_memory_mb"), reversible.get("peak_memory_mb")
    if not before or after is None or conventional.get("peak_memory_kind") != reversible.get("peak_memory_kind"):
        return None
    return 1 - after / before


def memory_saving(runs: list[dict], experiment: str) -> float | None:
    """`saved_fraction` of one experiment's reversible run, if both it and the conventional one ran."""
    by_mode = {run["mode"]: run for run in runs if run["experiment"] == experiment}
    if "conventional" not in by_mode or "reversible" not in by_mode:
        return None
    return saved_fraction(by_mode["conventional"], by_mode["reversible"])


def format_tables(results: dict) -> str:
    """Markdown tables per experiment (Mode, Final Loss, Val PPL, Test PPL, Peak Memory, Time,
    Epochs) and the reversible-vs-conventional memory saving, as on the model cards."""
    lines = []
    for experiment in EXPERIMENTS:
        runs = sorted((run for run in results["runs"] if run["experiment"] == experiment),
                      key=lambda run: MODES.index(run["mode"]))
        if not runs:
            continue
        lines += [f"### {EXPERIMENT_LABELS[experiment]} ({results['model_name']}, preset {results['preset']})", ""]
        lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
        lines.append("|" + "---|" * len(TABLE_COLUMNS))
        lines += ["| " + " | ".join(_row(run)) + " |" for run in runs]
        saving = memory_saving(results["runs"], experiment)
        if saving is not None:
            peaks = {run["mode"]: run["peak_memory_mb"] for run in runs}
            kind = runs[0].get("peak_memory_kind")
            lines += ["", f"Memory savings (reversible vs conventional): {_memory(peaks['conventional'])} -> "
                          f"{_memory(peaks['reversible'])} ({100 * saving:.1f}% saved, {kind})"]
        lines.append("")
    return "\n".join(lines)

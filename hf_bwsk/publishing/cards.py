"""The consolidated six-variant repo card (README.md) and its plots, from a finished run directory.

The front matter and the result tables are built as for a single variant's card
(:mod:`hf_bwsk.training.model_card`); this module adds the S/K table, both experiments, the memory
savings, the repository structure and the plots. Rendering is a pure function of the run's files.
"""

import logging
from pathlib import Path

from ..formatting import (
    NOT_MEASURED,
    fmt,
    fmt_memory,
    fmt_percent,
    fmt_setting,
    saved_fraction,
)
from ..layout import (
    EXPERIMENT_LABELS,
    EXPERIMENTS,
    LOSS_PLOT,
    MEMORY_PLOT,
    MODES,
    README,
    VARIANTS,
    run_lock,
)
from ..training.model_card import (
    dataset_label,
    eval_result,
    front_matter,
    measured_on,
    results_section,
    settings_table,
    software_line,
    template,
)
from .run import Run, load_run

logger = logging.getLogger(__name__)


def memory_saving(conventional: dict, reversible: dict) -> dict:
    saved = saved_fraction(conventional, reversible)
    return {
        "conventional": fmt_memory(conventional.get("peak_memory_mb")),
        "reversible": fmt_memory(reversible.get("peak_memory_mb")),
        "saved": NOT_MEASURED if saved is None else fmt_percent(saved),
    }


def sk_rows(analysis: dict | None) -> list[dict] | None:
    if not analysis:
        return None
    ratios, module_view = analysis.get("ratios", {}), analysis.get("module_view") or {}
    counts = analysis.get("op_counts") or {}
    return [
        {
            "kind": kind, "ops": counts.get(kind, NOT_MEASURED),
            "count": fmt_percent(ratios.get("count", {}).get(kind)),
            "bytes": fmt_percent(ratios.get("bytes", {}).get(kind)),
            "flops": fmt_percent(ratios.get("flops", {}).get(kind)),
            "module": fmt_percent(module_view.get(kind)),
        }
        for kind in ("S", "K", "Gray")
    ]


def default_repo_id(slug: str) -> str:
    return f"<your-namespace>/bwsk-{slug}"


def run_context(run: Run, repo_id: str) -> dict:
    results = run.results
    experiments = []
    for experiment in EXPERIMENTS:
        records = [run.variant(experiment, mode) for mode in MODES]
        experiments.append({
            "key": experiment, "label": EXPERIMENT_LABELS[experiment], "results": results_section(records),
            "saving": memory_saving(run.variant(experiment, "conventional"), run.variant(experiment, "reversible")),
        })
    patience = {(r.get("hyperparameters") or {}).get("early_stopping_patience") for r in run.variants.values()}
    dataset = results.get("dataset") or {}
    return {
        "title": f"BWSK {results.get('model_name', run.slug)}",
        "model_name": results.get("model_name", run.slug), "hf_id": results.get("hf_id"),
        "arch_family": results.get("arch_family") or NOT_MEASURED,
        "params": fmt(results.get("params_m"), ".2f") + ("M" if results.get("params_m") is not None else ""),
        "dataset": dataset_label(dataset),
        "early_stopping": ", ".join(str(p) for p in sorted(patience, key=str)) if None not in patience else None,
        "measured_on": overview_device(results, list(run.variants.values())),
        "base_model": results.get("hf_id") or (results.get("hyperparameters") or {}).get("base_model"),
        "preset": results.get("preset") or NOT_MEASURED, "seed": fmt_setting(results.get("seed")),
        "timestamp": results.get("timestamp") or NOT_MEASURED,
        "sk": sk_rows(results.get("analysis")),
        "sk_shape": analysis_shape(results.get("analysis")),
        "experiments": experiments,
        "settings": settings_table({e: [run.variant(e, m) for m in MODES] for e in EXPERIMENTS}),
        "setting_columns": [EXPERIMENT_LABELS[e] for e in EXPERIMENTS],
        "variants": list(VARIANTS), "structure": variant_structure(run),
        "repo_id": repo_id, "loss_plot": LOSS_PLOT, "memory_plot": MEMORY_PLOT,
        "software": software_line(results.get("versions")),
        "version": (results.get("versions") or {}).get("hf_bwsk") or NOT_MEASURED,
    }


def overview_device(results: dict, records: list[dict]) -> str:
    """The runner's device description with the precision the runs used, else the runs' own record."""
    if not results.get("device"):
        return measured_on(records)
    precisions = sorted({r.get("precision") or NOT_MEASURED for r in records})
    return f"{results['device']} ({', '.join(precisions)})"


def analysis_shape(analysis: dict | None) -> str:
    if not analysis or analysis.get("batch_size") is None or analysis.get("seq_len") is None:
        return NOT_MEASURED
    traced = f", traced on {analysis['device']} in {analysis['dtype']}" if analysis.get("device") else ""
    return f"batch {analysis['batch_size']} x sequence {analysis['seq_len']}{traced}"


def variant_structure(run: Run) -> list[str]:
    """One line per variant folder naming the files it ships, for the card's repository structure."""
    width = max(len(variant) for variant in VARIANTS) + 2
    return [f"{variant + '/':<{width}}{', '.join(path.name for path in paths)}" for variant, paths in run.files.items()]


def render_card(run_dir: "str | Path | Run", *, repo_id: str | None = None, license: str = "mit") -> str:
    """The consolidated repo's README.md for a six-variant run directory (front matter + body)."""
    run = load_run(run_dir)
    results = run.results
    evals = [eval_result(run.variant(e, m), results.get("dataset")) for e in EXPERIMENTS for m in MODES]
    head = front_matter(
        license=license, base_model=results.get("hf_id"), arch_family=results.get("arch_family"),
        dataset=results.get("dataset"), model_name=f"bwsk-{run.slug}", results=evals,
    )
    return head + template("repo_card.md.j2").render(**run_context(run, repo_id or default_repo_id(run.slug)))


def card_files(run_dir: "str | Path | Run", *, repo_id: str | None = None, license: str = "mit") -> dict[str, bytes]:
    """``{path_in_repo: content}`` of the card and the plots it references."""
    from .plots import loss_curves_png, peak_memory_png

    run = load_run(run_dir)
    records = list(run.variants.values())
    return {
        LOSS_PLOT: loss_curves_png(records),
        MEMORY_PLOT: peak_memory_png(records),
        README: render_card(run, repo_id=repo_id, license=license).encode("utf-8"),
    }


def write_card(run_dir: str | Path, *, repo_id: str | None = None, license: str = "mit") -> Path:
    """Write README.md and the plots into ``run_dir``, holding its lock (a run or push in it is
    refused, naming its pid: :func:`hf_bwsk.layout.run_lock`); return the README path."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        for path_in_repo, content in card_files(run_dir, repo_id=repo_id, license=license).items():
            target = run_dir / path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    logger.info("Wrote %s and plots", run_dir / README)
    return run_dir / README

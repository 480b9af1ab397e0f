"""Model cards for a run: the consolidated six-variant repo card and the card of a single variant.

The front matter is built from structured data: ``ModelCardData`` for the metadata and ``EvalResult``
objects for the model-index. huggingface_hub merges results that share task and dataset whenever it
renders YAML itself (so the six variants would collapse into one result), hence each ``EvalResult`` is
converted on its own with huggingface_hub's ``eval_results_to_model_index`` and the list is dumped
with ``yaml.safe_dump``. Nothing here loads a card and saves it again through ``ModelCard``.

The body comes from the Jinja templates in ``hf_bwsk/model_cards/``. Every number is read from
``results.json`` and the variants' ``training_results.json``; a value the run did not measure is
printed as "n/a". Rendering is a pure function of those files: same inputs, same bytes.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import BWSKError
from .results import saved_fraction
from .run_dir import EXPERIMENT_LABELS, EXPERIMENTS, MODE_LABELS, MODES, VARIANTS, variant_name

logger = logging.getLogger(__name__)


LOSS_PLOT = "plots/loss_curves.png"
MEMORY_PLOT = "plots/peak_memory.png"
NOT_MEASURED = "n/a"
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA max allocated",
    "cpu_bytes_kept_for_backward": "bytes kept for backward after one forward (CPU)",
}
PROJECT_TAGS = ("bwsk", "combinator-analysis", "reversible-backprop", "convergence-training")


def variant_label(experiment: str | None, mode: str) -> str:
    """Human name of a variant, e.g. ``Fine-tune (BWSK Reversible)``; the model-index result name."""
    if experiment is None:
        return MODE_LABELS[mode]
    return f"{EXPERIMENT_LABELS[experiment]} ({MODE_LABELS[mode]})"


@dataclass(frozen=True)
class Run:
    """A run directory read back: ``results.json`` and each variant's ``training_results.json``."""

    run_dir: Path
    results: dict
    variants: dict  # folder name -> training_results, in VARIANTS order

    @property
    def slug(self) -> str:
        return self.results["slug"]

    def variant(self, experiment: str, mode: str) -> dict:
        return self.variants[variant_name(experiment, mode)]


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BWSKError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BWSKError(f"{path} is not valid JSON ({error}); re-run the step that writes it") from error


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory in the experiment runner's layout, refusing a missing or mislabelled variant."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BWSKError(f"run directory {run_dir} does not exist; pass the output_dir of an experiment run")
    results = read_json(run_dir / "results.json", "pass the output_dir the experiment runner wrote")
    variants = {}
    for experiment in EXPERIMENTS:
        for mode in MODES:
            folder = variant_name(experiment, mode)
            record = read_json(run_dir / folder / "training_results.json",
                               f"variant {folder} is incomplete; finish or re-run it before publishing")
            if (record.get("experiment"), record.get("mode")) != (experiment, mode):
                raise BWSKError(
                    f"{run_dir / folder / 'training_results.json'} describes experiment={record.get('experiment')}"
                    f" mode={record.get('mode')}, not the folder {folder}; move it to its own folder"
                )
            variants[folder] = record
    return Run(run_dir, results, variants)


# -- number formatting: one place decides how each kind of value is printed -------------------------

def fmt(value, spec: str) -> str:
    return NOT_MEASURED if value is None else format(value, spec)


def fmt_percent(fraction) -> str:
    return NOT_MEASURED if fraction is None else f"{100 * fraction:.1f}%"


def fmt_memory(megabytes) -> str:
    if megabytes is None:
        return NOT_MEASURED
    if megabytes >= 1024:
        return f"{megabytes / 1024:.2f} GB"
    return f"{megabytes:.1f} MB" if megabytes >= 1 else f"{megabytes * 1024:.1f} KB"


def fmt_duration(seconds) -> str:
    if seconds is None:
        return NOT_MEASURED
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fmt_epochs(record: dict) -> str:
    epochs = fmt(record.get("epochs_completed"), "g")
    return f"{epochs} (early stop)" if record.get("early_stopped") else epochs


def fmt_setting(value) -> str:
    if value is None:
        return NOT_MEASURED
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# -- front matter --------------------------------------------------------------------------------

def eval_result(record: dict, dataset: dict | None):
    """The test perplexity of one variant as an ``EvalResult``; ``None`` when it or its data is unknown.

    The dataset is named by its Hub id for Hub data, else by the local corpus name.
    """
    from huggingface_hub import EvalResult

    if record.get("test_metric") is None or not dataset or not dataset.get("name"):
        return None
    return EvalResult(
        task_type="text-generation", task_name=variant_label(record.get("experiment"), record["mode"]),
        dataset_type=dataset["name"], dataset_name=dataset["name"],
        dataset_config=dataset.get("config_name") or dataset.get("config"), dataset_split="test",
        metric_type=record.get("metric_name", "perplexity"), metric_name=record.get("metric_name", "perplexity"),
        metric_value=record["test_metric"], verified=False,
    )


def model_index(model_name: str, results: list) -> list[dict]:
    """A model-index keeping every result separate (huggingface_hub would merge same task+dataset)."""
    from huggingface_hub.repocard_data import eval_results_to_model_index

    entries = [eval_results_to_model_index(model_name, [result])[0]["results"][0] for result in results]
    return [{"name": model_name, "results": entries}]


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id; ``None`` for a local path, which ``base_model`` must not hold."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def front_matter(*, license: str, base_model: str | None, arch_family: str | None, dataset: dict | None,
                 model_name: str, results: list) -> str:
    """The YAML block between ``---`` lines, dumped from data."""
    import yaml
    from huggingface_hub import ModelCardData

    tags = list(PROJECT_TAGS[:2]) + ([arch_family] if arch_family else []) + list(PROJECT_TAGS[2:])
    on_hub = dataset is not None and dataset.get("source") == "hub"
    metadata = ModelCardData(
        license=license, base_model=hub_model_id(base_model), library_name="transformers", pipeline_tag="text-generation",
        tags=tags, datasets=[dataset["name"]] if on_hub else None, metrics=["perplexity"],
    ).to_dict()
    present = [result for result in results if result is not None]
    if present:
        metadata["model-index"] = model_index(model_name, present)
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n"


# -- body ------------------------------------------------------------------------------------------

def template(name: str):
    from jinja2 import Environment, PackageLoader, StrictUndefined

    environment = Environment(
        loader=PackageLoader("hf_bwsk", "model_cards"), undefined=StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False,
    )
    return environment.get_template(name)


def measured_on(records: list[dict]) -> str:
    """Where the numbers of these records come from: device and autocast precision, as recorded."""
    pairs = sorted({(r.get("device") or NOT_MEASURED, r.get("precision") or NOT_MEASURED) for r in records})
    return "; ".join(f"{device} ({precision})" for device, precision in pairs)


def memory_note(records: list[dict]) -> str:
    kinds = sorted({r.get("peak_memory_kind") for r in records if r.get("peak_memory_mb") is not None})
    return ", ".join(MEMORY_KINDS.get(kind, kind or NOT_MEASURED) for kind in kinds) or NOT_MEASURED


def reversible_note(record: dict) -> str | None:
    """What reversible mode did in this run, as recorded: status, reason, recomputed ops, loss buffer."""
    reversible = record.get("reversible")
    if not reversible:
        return None
    parts = [reversible.get("status", NOT_MEASURED)]
    if reversible.get("reason"):
        parts.append(reversible["reason"])
    if reversible.get("loss"):
        parts.append(f"loss: {reversible['loss']}")
    plan = reversible.get("plan") or {}
    if plan.get("recomputed_ops") is not None:
        ops = ", ".join(f"`{op}` x{count}" for op, count in sorted(plan["recomputed_ops"].items()))
        parts.append(f"recomputed in backward: {ops or 'nothing'}")
    if plan.get("recompute_flops_fraction") is not None:
        parts.append(f"recompute FLOPs fraction: {plan['recompute_flops_fraction']:.3f}")
    grad_buffer = (record.get("bytes_kept_for_backward") or {}).get("grad_buffer_bytes")
    if grad_buffer:
        parts.append(f"the fused loss's weight-gradient buffer ({fmt_memory(grad_buffer / 2**20)}, the `.grad` "
                     "backward allocates anyway) is reported apart from peak memory")
    return "; ".join(parts)


def result_row(record: dict) -> dict:
    return {
        "mode": MODE_LABELS[record["mode"]],
        "final_loss": fmt(record.get("final_train_loss"), ".4f"),
        "val_ppl": fmt(record.get("best_val_metric"), ".2f"),
        "test_ppl": fmt(record.get("test_metric"), ".2f"),
        "peak_memory": fmt_memory(record.get("peak_memory_mb")),
        "time": fmt_duration(record.get("wall_time_s")),
        "epochs": fmt_epochs(record),
        "reversible": reversible_note(record),
    }


def memory_saving(conventional: dict, reversible: dict) -> dict:
    saved = saved_fraction(conventional, reversible)
    return {
        "conventional": fmt_memory(conventional.get("peak_memory_mb")),
        "reversible": fmt_memory(reversible.get("peak_memory_mb")),
        "saved": NOT_MEASURED if saved is None else fmt_percent(saved),
    }


def settings_table(columns: dict[str, list[dict]]) -> list[dict]:
    """Rows ``{"name", "cells"}`` of hyperparameters; a value differing across modes is shown per mode."""
    keys = sorted({key for records in columns.values() for r in records for key in (r.get("hyperparameters") or {})})
    rows = []
    for key in keys:
        values = []
        for records in columns.values():
            per_mode = {MODE_LABELS[r["mode"]]: fmt_setting((r.get("hyperparameters") or {}).get(key)) for r in records}
            distinct = set(per_mode.values())
            values.append(distinct.pop() if len(distinct) == 1 else ", ".join(f"{m}: {v}" for m, v in per_mode.items()))
        rows.append({"name": key, "cells": values})
    for name, field in (("seed", "seed"), ("precision", "precision"), ("device", "device")):
        rows.append({"name": name, "cells": [", ".join(sorted({fmt_setting(r.get(field)) for r in records}))
                                              for records in columns.values()]})
    return rows


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


def software_line(versions: dict | None) -> str:
    return ", ".join(f"{name} {version}" for name, version in (versions or {}).items() if version) or NOT_MEASURED


def default_repo_id(slug: str) -> str:
    return f"<your-namespace>/bwsk-{slug}"


def run_context(run: Run, repo_id: str) -> dict:
    results = run.results
    experiments = []
    for experiment in EXPERIMENTS:
        records = [run.variant(experiment, mode) for mode in MODES]
        experiments.append({
            "key": experiment, "label": EXPERIMENT_LABELS[experiment],
            "rows": [result_row(record) for record in records],
            "measured_on": measured_on(records), "memory_kind": memory_note(records),
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


def dataset_label(dataset: dict) -> str:
    if not dataset:
        return NOT_MEASURED
    name = dataset.get("name") or NOT_MEASURED
    config = dataset.get("config_name") or dataset.get("config")
    source = dataset.get("source")
    return name + (f" ({config})" if config else "") + (f", from {source}" if source and source != "hub" else "")


def analysis_shape(analysis: dict | None) -> str:
    if not analysis or analysis.get("batch_size") is None or analysis.get("seq_len") is None:
        return NOT_MEASURED
    traced = f", traced on {analysis['device']} in {analysis['dtype']}" if analysis.get("device") else ""
    return f"batch {analysis['batch_size']} x sequence {analysis['seq_len']}{traced}"


def variant_structure(run: Run) -> list[str]:
    """One line per variant folder naming the files it ships, for the card's repository structure."""
    from .hub import check_run

    width = max(len(variant) for variant in VARIANTS) + 2
    return [f"{variant + '/':<{width}}{', '.join(path.name for path in paths)}"
            for variant, paths in check_run(run.run_dir).items()]


def render_card(run_dir: str | Path, *, repo_id: str | None = None, license: str = "mit") -> str:
    """The consolidated repo's README.md for a six-variant run directory (front matter + body)."""
    run = load_run(run_dir)
    results = run.results
    evals = [eval_result(run.variant(e, m), results.get("dataset")) for e in EXPERIMENTS for m in MODES]
    head = front_matter(
        license=license, base_model=results.get("hf_id"), arch_family=results.get("arch_family"),
        dataset=results.get("dataset"), model_name=f"bwsk-{run.slug}", results=evals,
    )
    return head + template("repo_card.md.j2").render(**run_context(run, repo_id or default_repo_id(run.slug)))


def card_files(run_dir: str | Path, *, repo_id: str | None = None, license: str = "mit") -> dict[str, bytes]:
    """``{path_in_repo: content}`` of the card and the plots it references."""
    from .plots import loss_curves_png, peak_memory_png

    records = list(load_run(run_dir).variants.values())
    return {
        LOSS_PLOT: loss_curves_png(records),
        MEMORY_PLOT: peak_memory_png(records),
        "README.md": render_card(run_dir, repo_id=repo_id, license=license).encode("utf-8"),
    }


def write_card(run_dir: str | Path, *, repo_id: str | None = None, license: str = "mit") -> Path:
    """Write README.md and the plots into ``run_dir``; return the README path."""
    run_dir = Path(run_dir)
    for path_in_repo, content in card_files(run_dir, repo_id=repo_id, license=license).items():
        target = run_dir / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    logger.info("Wrote %s and plots", run_dir / "README.md")
    return run_dir / "README.md"


def render_variant_card(output_dir: str | Path, *, repo_id: str | None = None, base_model: str | None = None,
                        dataset: dict | str | None = None, license: str = "mit") -> str:
    """The README.md of one trained variant (one ``training_results.json``), for ``push_to_hub()``.

    ``dataset`` is the runner's dataset description (``{"source", "name", "config_name"}``) or a Hub
    dataset id; without it (and without a ``dataset`` field in the results) the card carries no
    model-index, since a result needs the data it was measured on. A ``base_model`` that is a local
    path is named in the text but kept out of the metadata (the Hub expects a model id there).
    """
    output_dir = Path(output_dir)
    record = read_json(output_dir / "training_results.json", "train with BWSKTrainer (its callback writes it)")
    dataset = dataset or record.get("dataset")
    if isinstance(dataset, str):
        dataset = {"source": "hub", "name": dataset}
    experiment, mode = record.get("experiment"), record.get("mode", "conventional")
    head = front_matter(
        license=license, base_model=base_model, arch_family=None, dataset=dataset,
        model_name=f"bwsk-{record.get('model_slug', output_dir.name)}",
        results=[eval_result(record, dataset)],
    )
    context = {
        "title": f"BWSK {record.get('model_slug', output_dir.name)}: {variant_label(experiment, mode)}",
        "base_model": base_model, "dataset": dataset_label(dataset or {}),
        "row": result_row(record), "measured_on": measured_on([record]), "memory_kind": memory_note([record]),
        "settings": settings_table({"value": [record]}), "repo_id": repo_id or output_dir.name,
        "software": software_line(record.get("versions")),
        "version": (record.get("versions") or {}).get("hf_bwsk") or NOT_MEASURED,
    }
    return head + template("variant_card.md.j2").render(**context)

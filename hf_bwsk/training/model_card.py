"""The model card of one trained run, and the card pieces the consolidated repo card reuses.

The front matter is built from structured data: ``ModelCardData`` for the metadata and ``EvalResult``
objects for the model-index. huggingface_hub merges results that share task and dataset whenever it
renders YAML itself (so six variants would collapse into one result), hence each ``EvalResult`` is
converted on its own with huggingface_hub's ``eval_results_to_model_index`` and the list is dumped
with ``yaml.safe_dump``. Nothing here loads a card and saves it again through ``ModelCard``.

The body comes from the Jinja templates in ``hf_bwsk/templates/``. Every number is read from the
results files; a value the run did not measure is printed as "n/a". Rendering is a pure function of
those files: same inputs, same bytes.
"""

from pathlib import Path

from ..formatting import (
    NOT_MEASURED,
    fmt_memory,
    fmt_setting,
    memory_note,
    result_cells,
    results_table,
)
from ..layout import MODE_LABELS, TRAINING_RESULTS, read_json, variant_label

PROJECT_TAGS = ("bwsk", "combinator-analysis", "reversible-backprop", "convergence-training")


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


def template(name: str):
    from jinja2 import Environment, PackageLoader, StrictUndefined

    environment = Environment(
        loader=PackageLoader("hf_bwsk", "templates"), undefined=StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False,
    )
    return environment.get_template(name)


def measured_on(records: list[dict]) -> str:
    """Where the numbers of these records come from: device and autocast precision, as recorded."""
    pairs = sorted({(r.get("device") or NOT_MEASURED, r.get("precision") or NOT_MEASURED) for r in records})
    return "; ".join(f"{device} ({precision})" for device, precision in pairs)


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
        steps = plan.get("recomputed_loop_steps") or {}
        ops = ", ".join(f"`{op}` x{count}" + (f" (loop of {steps[op]} steps)" if op in steps else "")
                        for op, count in sorted(plan["recomputed_ops"].items()))
        parts.append(f"recomputed in backward: {ops or 'nothing'}")
    if plan.get("skipped_ops"):
        ops = ", ".join(f"`{op}` x{count}" for op, count in sorted(plan["skipped_ops"].items()))
        parts.append(f"neither kept nor recomputed (output read by nothing backward needs): {ops}")
    if plan.get("recompute_flops_fraction") is not None:
        parts.append(f"recompute FLOPs fraction: {plan['recompute_flops_fraction']:.3f}")
    grad_buffer = (record.get("bytes_kept_for_backward") or {}).get("grad_buffer_bytes")
    if grad_buffer:
        parts.append(f"the fused loss's weight-gradient buffer ({fmt_memory(grad_buffer / 2**20)}, the `.grad` "
                     "backward allocates anyway) is reported apart from peak memory")
    return "; ".join(parts)


def results_section(records: list[dict]) -> dict:
    """The results table of some runs with where it was measured and what each run's reversible mode did."""
    return {
        "table": results_table(records),
        "measured_on": measured_on(records),
        "memory_kind": memory_note(records),
        "notes": [{"mode": result_cells(r)[0], "text": reversible_note(r)} for r in records if reversible_note(r)],
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


def software_line(versions: dict | None) -> str:
    return ", ".join(f"{name} {version}" for name, version in (versions or {}).items() if version) or NOT_MEASURED


def dataset_label(dataset: dict) -> str:
    if not dataset:
        return NOT_MEASURED
    name = dataset.get("name") or NOT_MEASURED
    config = dataset.get("config_name") or dataset.get("config")
    source = dataset.get("source")
    return name + (f" ({config})" if config else "") + (f", from {source}" if source and source != "hub" else "")


def render_variant_card(output_dir: str | Path, *, repo_id: str | None = None, base_model: str | None = None,
                        dataset: dict | str | None = None, license: str = "mit") -> str:
    """The README.md of one trained variant (one ``training_results.json``), for ``push_to_hub()``.

    ``dataset`` is the runner's dataset description (``{"source", "name", "config_name"}``) or a Hub
    dataset id; without it (and without a ``dataset`` field in the results) the card carries no
    model-index, since a result needs the data it was measured on. A ``base_model`` that is a local
    path is named in the text but kept out of the metadata (the Hub expects a model id there).
    """
    output_dir = Path(output_dir)
    record = read_json(output_dir / TRAINING_RESULTS, "train with BWSKTrainer (its callback writes it)")
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
        "results": results_section([record]),
        "settings": settings_table({"value": [record]}), "repo_id": repo_id or output_dir.name,
        "software": software_line(record.get("versions")),
        "version": (record.get("versions") or {}).get("hf_bwsk") or NOT_MEASURED,
    }
    return head + template("variant_card.md.j2").render(**context)

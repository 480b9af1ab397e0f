"""The one way every value and every results table is printed: terminal tables and model cards alike.

A value a run did not measure prints as "n/a"; sizes arrive in MB (2**20 bytes) as recorded.
"""

import json

from .layout import ACTIVATION_MEMORY_LABEL, MEMORY_KINDS, MODE_LABELS, MODES

NOT_MEASURED = "n/a"
# "Peak Memory" is the whole-step peak (as the published cards report it); "Activations Kept" what the forward
# keeps for backward (`activation_memory_mb`), the part the memory modes change.
RESULT_COLUMNS = ("Mode", "Final Loss", "Val Perplexity", "Test Perplexity", "Peak Memory", "Activations Kept",
                  "Time", "Epochs")


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


def fmt_diverged(diverged: dict) -> str:
    """Where a run stopped because its loss or gradient norm went non-finite."""
    return f"diverged at step {diverged['step']} ({diverged['metric']} {diverged['value']})"

def activation_memory_mb(record: dict) -> float | None:
    """MB of activations the forward kept for backward (results written before the field: from their bytes)."""
    if record.get("activation_memory_mb") is not None:
        return record["activation_memory_mb"]
    kept = (record.get("bytes_kept_for_backward") or {}).get("activation_bytes")
    return None if kept is None else kept / 2**20


def result_cells(record: dict) -> list[str]:
    """One ``training_results.json`` record as the cells of ``RESULT_COLUMNS``; a diverged run shows
    where it diverged instead of its losses and perplexities."""
    diverged = record.get("diverged")
    return [
        MODE_LABELS[record["mode"]],
        fmt_diverged(diverged) if diverged else fmt(record.get("final_train_loss"), ".4f"),
        NOT_MEASURED if diverged else fmt(record.get("best_val_metric"), ".2f"),
        NOT_MEASURED if diverged else fmt(record.get("test_metric"), ".2f"),
        fmt_memory(record.get("peak_memory_mb")),
        fmt_memory(activation_memory_mb(record)),
        fmt_duration(record.get("wall_time_s")),
        fmt_epochs(record),
    ]


def memory_column(records: list[dict]) -> str:
    """The memory column's title: "Peak Memory" only for one kind of whole-step peak; otherwise what
    the figures are (``layout.MEMORY_KINDS``), so bytes kept after a forward are not called a peak."""
    kinds = {r.get("peak_memory_kind") for r in records if r.get("peak_memory_mb") is not None}
    if not kinds or kinds in ({"cuda_max_allocated"}, {"cpu_whole_step_peak"}):
        return "Peak Memory"
    if len(kinds) > 1:
        return "Memory (kinds differ, see note)"
    (kind,) = kinds
    return "Memory: " + MEMORY_KINDS.get(kind, str(kind))


def results_table(records: list[dict]) -> str:
    """The markdown results table of some variants, in mode order (the published cards' columns)."""
    rows = sorted(records, key=lambda record: MODES.index(record["mode"]))
    columns = [memory_column(records) if column == "Peak Memory" else column for column in RESULT_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(result_cells(record)) + " |" for record in rows]
    return "\n".join(lines)


def saved_fraction(conventional: dict, reversible: dict) -> float | None:
    """Fraction of peak memory the reversible run saved against the conventional one; None unless
    both were measured, the same way (a CUDA peak and CPU bytes kept are not comparable)."""
    before, after = conventional.get("peak_memory_mb"), reversible.get("peak_memory_mb")
    if not before or after is None or conventional.get("peak_memory_kind") != reversible.get("peak_memory_kind"):
        return None
    return 1 - after / before


def memory_note(records: list[dict]) -> str:
    """What the records' memory figures measure: the peak's kind, and what "Activations Kept" is."""
    kinds = sorted({r.get("peak_memory_kind") for r in records if r.get("peak_memory_mb") is not None})
    peak = ", ".join(MEMORY_KINDS.get(kind, kind or NOT_MEASURED) for kind in kinds) or NOT_MEASURED
    return f"{peak}; Activations Kept: {ACTIVATION_MEMORY_LABEL}"

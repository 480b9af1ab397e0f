"""The card's plots as PNG bytes: loss curves of the six variants, peak memory per mode.

matplotlib is imported inside the functions (``import hf_bwsk`` stays light) and used through its
object API with the Agg canvas, so no global pyplot state or display backend is involved. The PNGs
carry no software/time metadata: the same results give the same bytes.
"""

import importlib.util
import io

from ..errors import BWSKError
from ..formatting import memory_note
from ..layout import EXPERIMENT_LABELS, EXPERIMENTS, MODE_LABELS, MODES

MODE_COLORS = {"conventional": "tab:gray", "analyzed": "tab:blue", "reversible": "tab:green"}
# Modes with the same gradients give the same curves: decreasing widths keep coinciding lines visible.
MODE_WIDTHS = {"conventional": 5.0, "analyzed": 3.0, "reversible": 1.2}


def _figure(width: float, height: float, columns: int):
    if importlib.util.find_spec("matplotlib") is None:
        raise BWSKError("the card's plots need matplotlib; install it with: pip install 'hf-bwsk[plot]'")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _by_experiment(records: list[dict]) -> dict[str, list[dict]]:
    grouped = {experiment: [] for experiment in EXPERIMENTS}
    for record in sorted(records, key=lambda r: MODES.index(r["mode"])):
        grouped.setdefault(record.get("experiment"), []).append(record)
    return {experiment: group for experiment, group in grouped.items() if group}


def loss_curves_png(records: list[dict]) -> bytes:
    """Training loss (solid) and validation loss (dashed) per step, one panel per experiment."""
    grouped = _by_experiment(records)
    figure, axes = _figure(5.0 * len(grouped), 3.8, len(grouped))
    for ax, (experiment, group) in zip(axes, grouped.items()):
        for record in group:
            mode = record["mode"]
            style = {"color": MODE_COLORS[mode], "linewidth": MODE_WIDTHS[mode], "alpha": 0.8}
            # Non-finite losses were written as null: they are left out, never drawn as numbers.
            train = [p for p in record.get("loss_curve") or [] if p.get("loss") is not None]
            val = [p for p in record.get("val_curve") or [] if p.get("loss") is not None]
            label = MODE_LABELS[mode]
            if record.get("diverged"):
                label += f" (diverged at step {record['diverged']['step']})"
                ax.axvline(record["diverged"]["step"], color=MODE_COLORS[mode], linestyle=":")
            ax.plot([p["step"] for p in train], [p["loss"] for p in train], label=f"{label} train", **style)
            ax.plot([p["step"] for p in val], [p["loss"] for p in val], linestyle="--", marker="o",
                    markersize=2 + MODE_WIDTHS[mode], label=f"{label} val", **style)
        ax.set_title(EXPERIMENT_LABELS.get(experiment, str(experiment)))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(figure)


def peak_memory_png(records: list[dict]) -> bytes:
    """Peak memory in MB per mode, one group of bars per experiment; unmeasured bars are marked n/a."""
    grouped = _by_experiment(records)
    figure, (ax,) = _figure(6.0, 3.8, 1)
    width = 0.8 / len(MODES)
    for offset, mode in enumerate(MODES):
        for position, group in enumerate(grouped.values()):
            record = next((r for r in group if r["mode"] == mode), None)
            x = position + (offset - 1) * width
            value = None if record is None else record.get("peak_memory_mb")
            if value is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8)
                continue
            ax.bar(x, value, width, color=MODE_COLORS[mode], label=MODE_LABELS[mode] if position == 0 else None)
            ax.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(grouped)), [EXPERIMENT_LABELS.get(e, str(e)) for e in grouped])
    ax.set_ylabel("peak memory (MB)")
    ax.set_title(f"Peak memory per mode: {memory_note(records)}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(figure)

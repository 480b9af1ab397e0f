"""A PNG map of an `SKReport`: one row per decoder layer, one cell per data-path op, coloured by kind."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BWSKError
from .rules import GRAY, K, S

COLOURS = {S: "#2e7d32", K: "#c62828", GRAY: "#9e9e9e"}
_EMPTY = "#ffffff"


def plot_layer_map(report, path: str | os.PathLike) -> Path:
    """Save the layer map of ``report`` (an op-granularity `SKReport`) to ``path`` and return it.

    Raises:
        BWSKError: if matplotlib is missing or the report has no traced ops.
    """
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise BWSKError("plotting needs matplotlib; install it with: pip install 'hf-bwsk[plot]'") from error
    if not report.records:
        raise BWSKError("this report has no traced ops (module granularity); analyze with granularity='op' to plot")
    rows = [[record.kind for record in report.layer_records(layer)] for layer in range(report.num_layers)]
    width = max((len(row) for row in rows), default=0) or 1
    codes = {_EMPTY: 0, S: 1, K: 2, GRAY: 3}
    grid = [[codes[kind] for kind in row] + [0] * (width - len(row)) for row in rows]
    colours = ListedColormap([_EMPTY, COLOURS[S], COLOURS[K], COLOURS[GRAY]])
    # A bare Figure (no pyplot) leaves the caller's matplotlib backend and state alone.
    figure = Figure(figsize=(min(6 + width / 25, 24), 2 + 0.35 * len(rows)))
    axes = figure.subplots()
    axes.imshow(grid, cmap=colours, vmin=0, vmax=3, aspect="auto", interpolation="nearest")
    axes.set_xlabel("data-path op within the layer (execution order)")
    axes.set_ylabel("decoder layer")
    axes.set_yticks(range(len(rows)))
    ratios = report.ratios("count")
    axes.set_title(
        f"{report.model_name or report.model_class}\nS {ratios[S]:.1%} / K {ratios[K]:.1%} / Gray {ratios[GRAY]:.1%} "
        f"of data-path ops (batch {report.batch_size} x sequence {report.seq_len})",
        fontsize=9,
    )
    axes.legend(handles=[Patch(color=COLOURS[kind], label=kind) for kind in (S, K, GRAY)],
                loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path

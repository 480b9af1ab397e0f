"""The analysis as one self-contained HTML page: per-layer S/K map, CALM phases and sync points per
axis, the hidden-axis sharding plan, every op with its reason, and the recompute plan if any.

No scripts, fonts or images are fetched: styles are inline and the maps are plain elements, so the
file opens offline and can be attached to a bug report or a model repo. The recompute plan comes
in as plain data (`RecomputePlan.summary()`), since the analysis sits below the memory layer.
"""

from __future__ import annotations

import os
from collections import Counter
from html import escape
from pathlib import Path

from .calm import PARALLELISM, CalmReport
from .records import OpRecord
from .report import RATIO_WEIGHTS, SKReport
from .rules import KINDS

COLOURS = {"S": "#4e79a7", "K": "#e15759", "Gray": "#9c9c9c"}
SYNC_COLOUR = "#f28e2b"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.map { display: flex; flex-wrap: nowrap; gap: 1px; margin: 1px 0; align-items: center; }
.map .label { width: 5em; font-size: 0.8em; flex: none; }
.cell { width: 9px; height: 16px; flex: none; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 6px; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(report: SKReport, calm: CalmReport | None = None, recompute_plan: dict | None = None) -> str:
    """The page for an op-level `SKReport`, with its CALM report and a recompute-plan summary if given."""
    title = f"S/K analysis of {report.model_name or report.model_class}"
    parts = [
        f"<h1>{escape(title)}</h1>",
        f"<p class=note>{escape(report.model_class)}, batch {report.batch_size} x sequence {report.seq_len}, "
        f"traced on {escape(report.device)} in {escape(report.dtype)}; "
        + escape(", ".join(f"{name} {version}" for name, version in report.versions.items() if version))
        + "</p>",
        _ratios(report),
        _layer_map(report),
    ]
    if calm is not None:
        parts += [_calm(calm), _sharding(calm)]
    if recompute_plan is not None:
        parts.append(_recompute(recompute_plan))
    parts.append(_ops(report))
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def save_html(path: str | os.PathLike, report: SKReport, calm: CalmReport | None = None,
              recompute_plan: dict | None = None) -> Path:
    path = Path(path)
    path.write_text(render_html(report, calm, recompute_plan), encoding="utf-8")
    return path


def _table(header: list[str], rows: list[list], numeric: tuple[int, ...] = ()) -> str:
    """A table; the columns at positions ``numeric`` are right-aligned."""
    head = "".join(f"<th>{escape(str(item))}</th>" for item in header)
    body = "".join(
        "<tr>" + "".join(
            f"<td{' class=num' if position in numeric else ''}>{escape(str(item))}</td>"
            for position, item in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _ratios(report: SKReport) -> str:
    rows = [[by] + [f"{share:.1%}" for share in report.ratios(by).values()] for by in RATIO_WEIGHTS]
    rows.append(["module view (published cards)"] + [f"{share:.1%}" for share in report.module_view.ratios().values()])
    loops = "".join(
        f"<li>loop over the sequence in {escape(loop.module_path)}: {loop.body_ops} ops x {loop.steps} steps, "
        f"counted as {loop.body_ops} logical ops</li>"
        for loop in report.sequence_loops()
    )
    loops = f"<details><summary>{len(report.sequence_loops())} loop(s) over the sequence</summary><ul>{loops}</ul></details>" if loops else ""
    counts = report.summary()
    return (
        "<h2>S / K / Gray shares</h2>"
        f"<p>{counts['data_path_ops']} data-path ops ({counts['logical_ops']} logical), "
        f"{counts['auxiliary_ops']} auxiliary, {counts['skipped_identities']} identities skipped.</p>"
        + _table(["weight", *KINDS], rows, (1, 2, 3))
        + loops
    )


def _cell(record: OpRecord, colour: str, extra: str = "") -> str:
    repeats = f" x {record.repeats} steps" if record.repeats > 1 else ""
    tip = f"{record.op} @ {record.path_in_layer or record.module_path or '<model>'}: {record.kind}, {record.reason}{repeats}{extra}"
    return f"<div class=cell style='background:{colour}' title='{escape(tip, quote=True)}'></div>"


def _legend(entries: dict[str, str]) -> str:
    return "<p class=legend>" + "".join(
        f"<span style='background:{colour};color:{_text_colour(colour)}'>{escape(name)}</span>"
        for name, colour in entries.items()) + "</p>"


def _text_colour(background: str) -> str:
    """Dark text on light backgrounds, white on dark ones (#rrggbb)."""
    red, green, blue = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#222" if 0.299 * red + 0.587 * green + 0.114 * blue > 160 else "#fff"


def _layer_map(report: SKReport) -> str:
    rows = []
    for layer in range(report.num_layers):
        cells = "".join(_cell(record, COLOURS[record.kind]) for record in report.layer_records(layer))
        rows.append(f"<div class=map><span class=label>layer {layer}</span>{cells}</div>")
    return ("<h2>Per-layer S/K map</h2><p class=note>One cell per logical data-path op, in execution order "
            "(hover for the op, its module and the reason).</p>" + _legend(COLOURS) + "".join(rows))


def _range(values) -> str:
    """'3' for equal values, '3-5' for a spread (per-layer counts)."""
    found = sorted(set(values)) or [0]
    return str(found[0]) if len(found) == 1 else f"{found[0]}-{found[-1]}"


def _calm(calm: CalmReport) -> str:
    rows = []
    for axis, axis_report in calm.axes.items():
        label = "upper bound" if axis == "hidden" else "sync points"
        rows.append([axis, PARALLELISM[axis], f"{len(axis_report.sync_points)} ({label})",
                     _range(axis_report.layer_sync_counts.values()), axis_report.outside_layers,
                     len(axis_report.phases)])
    maps = []
    layer_zero = [record for record in calm.records if record.layer == 0]
    for axis, axis_report in calm.axes.items():
        syncs = {point.index for point in axis_report.sync_points}
        cells = "".join(_cell(record, SYNC_COLOUR if record.index in syncs else "#d7e3ef",
                              " (sync point)" if record.index in syncs else "") for record in layer_zero)
        maps.append(f"<div class=map><span class=label>{axis}</span>{cells}</div>")
    return (
        f"<h2>CALM: phases and sync points per axis</h2><p class=note>Traced at batch {calm.batch_size} x "
        f"sequence {calm.seq_len} (sizes that tell the axes apart). Element-wise ops are coordination-free; "
        "an op mixing along the sharded axis is a sync point, and the ops between two of them form a "
        "coordination-free phase. Along hidden this counts every op that mixes features: an upper bound, "
        "see the sharding plan below.</p>"
        + _table(["axis", "parallelism", "sync points", "per layer", "outside layers", "free phases"], rows, (3, 4, 5))
        + "<p>Layer 0 per axis: coordination-free ops and sync points</p>"
        + _legend({"coordination-free": "#d7e3ef", "sync point": SYNC_COLOUR})
        + "".join(maps)
    )


def _sharding(calm: CalmReport) -> str:
    plan = calm.hidden_plan
    if plan is None or not plan.layers:
        return ""
    first = plan.layers[0]
    linears = _table(["linear (layer 0)", "split"], [[name, choice] for name, choice in first.linears.items()])
    collectives = _table(["collective (layer 0)", "after op", "where"],
                         [[item.kind, item.op, f"layer.{item.path_in_layer}".rstrip(".")] for item in first.collectives])
    outside = ", ".join(f"{item.kind} after {item.op}" for item in plan.outside.collectives) if plan.outside else ""
    return (
        "<h2>Tensor-parallel sharding plan (hidden axis)</h2>"
        f"<p><b>{_range(plan.layer_collectives().values())} collective(s) per layer</b>, "
        f"{plan.total()} in the whole forward, against an upper bound of "
        f"{len(calm.axes['hidden'].sync_points)} sync points. Column-parallel: weight split by output "
        "features; row-parallel: by input features (its output is a partial sum).</p>"
        + linears + collectives + (f"<p>Outside the layers: {escape(outside)}</p>" if outside else "")
    )


def _recompute(summary: dict) -> str:
    rows = [[key, value] for key, value in summary.items() if not isinstance(value, dict)]
    recomputed = summary.get("recomputed_ops") or {}
    steps = summary.get("recomputed_loop_steps") or {}
    note = ("<p class=note>An op of a loop over the sequence (\"per step\") counts once per loop; "
            "its loop's number of steps beside it.</p>" if steps else "")
    skipped = summary.get("skipped_ops") or {}
    return (
        "<h2>Recompute plan</h2>" + _table(["field", "value"], rows) + note
        + _table(["recomputed op (path:op)", "count", "loop steps"],
                 [[name, count, steps.get(name, "")] for name, count in recomputed.items()], (1, 2))
        + (_table(["skipped op: neither kept nor recomputed (path:op)", "count"],
                  [[name, count] for name, count in skipped.items()], (1,)) if skipped else "")
    )


def _ops(report: SKReport) -> str:
    found = Counter((record.op, record.kind, record.reason) for record in report.logical_records)
    rows = [[op, kind, count, reason] for (op, kind, reason), count in sorted(found.items(), key=lambda i: (-i[1], i[0]))]
    header = "<h2>Ops and their reasons</h2><p class=note>Logical data-path ops (a loop's body counts once).</p>"
    return header + _table(["op", "kind", "count", "reason"], rows, (2,))

"""CALM report: where a sharded forward must synchronise, per sharding axis.

After Hellerstein & Alvaro's "Keeping CALM": a computation is coordination-free when it is
monotone over growing inputs. For a network sharded along an axis, element-wise ops are
coordination-free; an op that reduces, contracts or mixes along that axis needs the other shards'
data, a synchronisation point. A loop over the sequence (`steps.py`) counts its body once: a
sync point inside it carries the loop's repeat count. The axes: batch (data parallel), sequence (context parallel) and
hidden (tensor parallel). Between two sync points lies a coordination-free phase.

The per-op mixing rules are in `mixing.py`; telling which dim is which axis needs a trace at
probe sizes (`axes.py`), so a report traced at other sizes is re-traced from its config.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from transformers import PretrainedConfig, PreTrainedModel

from .analyzer import analyze, build_model
from .axes import AXES, BATCH, HIDDEN, SEQUENCE, model_sizes, probe_sizes
from .records import OpRecord
from .report import Phase, SKReport
from .sharding import ShardingPlan, hidden_plan

PARALLELISM = {BATCH: "data parallel", SEQUENCE: "context parallel", HIDDEN: "tensor parallel"}


@dataclass(frozen=True)
class SyncPoint:
    """An op that mixes along the axis: shards must exchange data here."""

    index: int
    op: str
    module_path: str
    layer: int | None
    path_in_layer: str | None
    repeats: int = 1


@dataclass
class AxisReport:
    """Sync points and coordination-free phases along one axis."""

    axis: str
    sync_points: list[SyncPoint]
    phases: list[Phase]
    layer_sync_counts: dict[int, int]
    layer_phase_counts: dict[int, int]

    @property
    def outside_layers(self) -> int:
        return sum(point.layer is None for point in self.sync_points)

    def to_dict(self) -> dict:
        return {
            "axis": self.axis,
            "parallelism": PARALLELISM[self.axis],
            "sync_count": len(self.sync_points),
            "sync_points": [asdict(point) for point in self.sync_points],
            "phases": [list(phase) for phase in self.phases],
            "layer_sync_counts": self.layer_sync_counts,
            "layer_phase_counts": self.layer_phase_counts,
        }


@dataclass
class CalmReport:
    """Per-axis sync points and coordination-free phases of one traced forward, per layer and in total."""

    model_class: str
    batch_size: int
    seq_len: int
    num_layers: int
    axes: dict[str, AxisReport]
    hidden_plan: ShardingPlan | None = None
    # The logical data-path records it was built from (for maps, e.g. the HTML report); not serialised.
    records: list[OpRecord] = field(default_factory=list, repr=False, compare=False)

    def sync_counts(self) -> dict[str, int]:
        return {axis: len(report.sync_points) for axis, report in self.axes.items()}

    def to_dict(self) -> dict:
        return {
            "model_class": self.model_class,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_layers": self.num_layers,
            "sync_counts": self.sync_counts(),
            "axes": {axis: report.to_dict() for axis, report in self.axes.items()},
            "hidden_plan": self.hidden_plan.to_dict() if self.hidden_plan else None,
        }

    def to_table(self) -> str:
        lines = [
            f"CALM report of {self.model_class}: sync points per sharding axis "
            f"(traced at batch {self.batch_size} x sequence {self.seq_len}, sizes that tell the axes apart)",
            "",
            "(the hidden count is an upper bound: every op mixing features; the sharding plan below needs fewer)",
            "",
            f"{'axis':<9} {'parallelism':<17} {'sync points':>11} {'per layer':>10} {'outside layers':>14} "
            f"{'free phases':>11} {'longest phase':>13}",
        ]
        for axis, report in self.axes.items():
            per_layer = sorted(set(report.layer_sync_counts.values())) or [0]
            per_layer_text = str(per_layer[0]) if len(per_layer) == 1 else f"{per_layer[0]}-{per_layer[-1]}"
            longest = max((phase.ops for phase in report.phases), default=0)
            lines.append(
                f"{axis:<9} {PARALLELISM[axis]:<17} {len(report.sync_points):>11} {per_layer_text:>10} "
                f"{report.outside_layers:>14} {len(report.phases):>11} {longest:>13}"
            )
        lines += ["", "sync ops per axis (op @ module, relative to its layer; count):"]
        for axis, report in self.axes.items():
            found = Counter(
                (point.op, point.module_path if point.layer is None else f"layer.{point.path_in_layer}".rstrip("."),
                 point.repeats)
                for point in report.sync_points
            )
            lines.append(f"  {axis}:")
            for (op, where, repeats), count in sorted(found.items(), key=lambda item: (-item[1], item[0])):
                per_step = f" (once per step of a loop over the sequence, {repeats} steps)" if repeats > 1 else ""
                lines.append(f"    {op} @ {where or '<model>'}: {count}{per_step}")
        if self.hidden_plan is not None:
            lines += ["", *self._plan_lines()]
        return "\n".join(lines)

    def _plan_lines(self) -> list[str]:
        plan = self.hidden_plan
        per_layer = sorted(set(plan.layer_collectives().values())) or [0]
        per_layer_text = str(per_layer[0]) if len(per_layer) == 1 else f"{per_layer[0]}-{per_layer[-1]}"
        lines = [f"tensor-parallel sharding plan (hidden axis): {per_layer_text} collective(s) per layer, "
                 f"{plan.total()} in the forward (upper bound: {len(self.axes[HIDDEN].sync_points)} sync points)"]
        if plan.layers:
            first = plan.layers[0]
            lines.append("  layer 0 linears: " + ", ".join(f"{name} {choice}" for name, choice in first.linears.items()))
            lines += [f"  layer 0 {item.kind} after {item.op} @ layer.{item.path_in_layer}".rstrip(".")
                      for item in first.collectives]
        if plan.outside is not None:
            lines += [f"  outside the layers: {item.kind} after {item.op}" for item in plan.outside.collectives]
        return lines


def calm_report(source: PreTrainedModel | PretrainedConfig | SKReport) -> CalmReport:
    """The CALM report of a causal LM, its config, or an `SKReport`.

    A report whose traced sizes identify the axes is used as is; otherwise (e.g. batch 2 x 128) the
    model is re-traced (a report's from its config, on the meta device) at probe sizes: distinct
    primes that divide none of the model's own sizes.
    """
    if isinstance(source, SKReport):
        report = source if source.axis_sizes else _probe_trace(source.config)
    else:
        report = _probe_trace(source)
    return _from_report(report)


def _probe_trace(source) -> SKReport:
    model = build_model(source)
    probe = probe_sizes(model_sizes(model))
    return analyze(model, seq_len=probe.sequence, batch_size=probe.batch)


def _from_report(report: SKReport) -> CalmReport:
    data = report.logical_records
    axes = {axis: _axis_report(axis, data, report.num_layers) for axis in AXES}
    plan = hidden_plan(report.records, report.num_layers)
    return CalmReport(report.model_class, report.batch_size, report.seq_len, report.num_layers, axes, plan, data)


def _axis_report(axis: str, data: list[OpRecord], num_layers: int) -> AxisReport:
    sync_points, phases = [], []
    layer_syncs = dict.fromkeys(range(num_layers), 0)
    layer_phases = dict.fromkeys(range(num_layers), 0)
    run: list[OpRecord] = []
    layer_run: list[OpRecord] = []

    def close(current: list[OpRecord], into: list | None) -> None:
        if current:
            if into is not None:
                into.append(Phase(current[0].index, current[-1].index, len(current)))
            else:
                layer_phases[current[0].layer] += 1
            current.clear()

    for record in data:
        if layer_run and layer_run[-1].layer != record.layer:
            close(layer_run, None)
        if axis in record.mixes:
            close(run, phases)
            close(layer_run, None)
            sync_points.append(SyncPoint(record.index, record.op, record.module_path, record.layer,
                                         record.path_in_layer, record.repeats))
            if record.layer is not None:
                layer_syncs[record.layer] += 1
            continue
        run.append(record)
        if record.layer is not None:
            layer_run.append(record)
    close(run, phases)
    close(layer_run, None)
    return AxisReport(axis, sync_points, phases, layer_syncs, layer_phases)

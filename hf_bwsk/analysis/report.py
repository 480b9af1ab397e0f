"""`SKReport`: the classified ops of one traced forward, with ratios, breakdowns and serialisation."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import BWSKError
from .module_view import ModuleView
from .records import OpRecord
from .rules import KINDS

_WEIGHTS = {"count": lambda record: 1, "bytes": lambda record: record.output_bytes, "flops": lambda record: record.flops}
RATIO_WEIGHTS = tuple(_WEIGHTS)


class SequenceLoop(NamedTuple):
    """A loop over the sequence: ``body_ops`` records run once per step, ``steps`` times."""

    first: int
    module_path: str
    layer: int | None
    body_ops: int
    steps: int


class Phase(NamedTuple):
    """A maximal run of consecutive ops (indices into `SKReport.records`, inclusive)."""

    first: int
    last: int
    ops: int


@dataclass
class SKReport:
    """S/K/Gray classification of every aten op a causal LM's forward (with loss) executes.

    Ratios count data-path ops only: auxiliary ops (mask, position and rotary-table building) are
    kept in `records` with ``data_path=False``, identities (aliases, copies, dropout p=0) are
    counted in `skipped`. With ``granularity="module"`` there is no trace: `records` is empty and
    `ratios` gives the leaf-module view.
    """

    model_class: str
    model_type: str
    seq_len: int
    batch_size: int
    granularity: str
    device: str
    dtype: str
    layers_path: str
    num_layers: int
    records: list[OpRecord]
    skipped: dict[str, int]
    module_view: ModuleView
    config: dict
    versions: dict
    axis_sizes: dict | None = None
    model_name: str = ""
    _data: list[OpRecord] | None = field(default=None, init=False, repr=False, compare=False)
    _logical: list[OpRecord] | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------ views of the records
    @property
    def data_records(self) -> list[OpRecord]:
        if self._data is None:
            self._data = [record for record in self.records if record.data_path]
        return self._data

    @property
    def logical_records(self) -> list[OpRecord]:
        """The data-path ops as counted: a loop over the sequence contributes its body once."""
        if self._logical is None:
            self._logical = [record for record in self.data_records if record.is_logical]
        return self._logical

    def sequence_loops(self) -> list[SequenceLoop]:
        """The loops over the sequence found in the trace (`steps.py`), in execution order."""
        loops: list[SequenceLoop] = []
        previous = None
        for record in self.records:
            if record.repeats > 1:
                starts = previous is None or previous.repeats == 1 or record.step < previous.step
                if starts:
                    loops.append(SequenceLoop(record.index, record.module_path, record.layer, 0, record.repeats))
                if record.step == 0:
                    loops[-1] = loops[-1]._replace(body_ops=loops[-1].body_ops + 1)
            previous = record
        return loops

    def ratios(self, by: str = "count") -> dict[str, float]:
        """Fractions of S, K and Gray among data-path ops, weighted by op count (logical ops: a loop
        over the sequence counts its body once), output bytes or FLOPs (every step); they sum to 1
        (all 0.0 when nothing carries that weight)."""
        if by not in RATIO_WEIGHTS:
            raise BWSKError(f"unknown ratio weight '{by}'; use one of {', '.join(RATIO_WEIGHTS)}")
        if self.granularity == "module":
            if by != "count":
                raise BWSKError("the module view only counts leaves; analyze with granularity='op' for bytes/flops")
            return self.module_view.ratios()
        weight, totals = _WEIGHTS[by], Counter()
        for record in self.logical_records if by == "count" else self.data_records:
            totals[record.kind] += weight(record)
        grand = sum(totals.values())
        return {kind: (totals[kind] / grand if grand else 0.0) for kind in KINDS}

    def op_counts(self) -> dict[str, int]:
        """Logical data-path ops per kind (leaf modules per kind in the module view)."""
        if self.granularity == "module":
            return self.module_view.counts()
        found = Counter(record.kind for record in self.logical_records)
        return {kind: found.get(kind, 0) for kind in KINDS}

    @property
    def unclassified(self) -> list[str]:
        """Sorted names of the ops no rule covers (they count as Gray)."""
        return sorted({record.op for record in self.records if record.reason.startswith("unclassified")})

    def layer_records(self, layer: int) -> list[OpRecord]:
        """The logical data-path ops of one decoder layer, in execution order."""
        return [record for record in self.logical_records if record.layer == layer]

    # ------------------------------------------------------------ output
    def summary(self) -> dict:
        """The small dict results files keep: ratios by count/bytes/flops, op counts, module view."""
        weights = ("count",) if self.granularity == "module" else RATIO_WEIGHTS
        return {
            "granularity": self.granularity,
            "ratios": {by: self.ratios(by) for by in weights},
            "op_counts": self.op_counts(),
            "auxiliary_ops": sum(not record.data_path for record in self.records),
            "data_path_ops": len(self.data_records),
            "logical_ops": len(self.logical_records),
            "sequence_loops": [loop._asdict() for loop in self.sequence_loops()],
            "skipped_identities": sum(self.skipped.values()),
            "unclassified": self.unclassified,
            "module_view": self.module_view.ratios(),
            "module_view_counts": self.module_view.counts(),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
        }

    def to_table(self) -> str:
        """A readable text report: ratios, and counts by module class and by (op, kind, reason)."""
        if self.granularity == "module":
            return self.module_view.to_table()
        data, logical = self.data_records, self.logical_records
        lines = [
            f"S/K analysis of {self.model_name or self.model_class} ({self.model_class}), "
            f"batch {self.batch_size} x sequence {self.seq_len}, traced on {self.device} in {self.dtype}",
            f"{len(data)} data-path ops ({len(logical)} logical), {len(self.records) - len(data)} auxiliary ops "
            f"(masks, positions; not in the ratios), {sum(self.skipped.values())} identities skipped",
        ]
        alike = Counter((loop.body_ops, loop.steps) for loop in self.sequence_loops())
        for (body_ops, steps), count in alike.items():
            lines.append(f"{count} loop(s) over the sequence ({body_ops} ops x {steps} steps each), counted as "
                         f"{body_ops} logical ops each (bytes and FLOPs: every step)")
        lines += ["", f"{'weight':<8}" + "".join(f"{kind:>9}" for kind in KINDS)]
        for by in RATIO_WEIGHTS:
            lines.append(f"{by:<8}" + "".join(f"{share:>9.1%}" for share in self.ratios(by).values()))
        lines += ["", f"{'module class':<32} {'ops':>7}" + "".join(f"{kind:>7}" for kind in KINDS)]
        by_class: dict[str, Counter] = {}
        for record in logical:
            by_class.setdefault(record.module_class, Counter())[record.kind] += 1
        for module_class, counts in sorted(by_class.items(), key=lambda item: -sum(item[1].values())):
            lines.append(f"{module_class:<32} {sum(counts.values()):>7}" + "".join(f"{counts[k]:>7}" for k in KINDS))
        lines += ["", f"{'op':<44} {'kind':<5} {'count':>7}  reason"]
        by_op = Counter((record.op, record.kind, record.reason) for record in logical)
        for (op, kind, reason), count in sorted(by_op.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"{op:<44} {kind:<5} {count:>7}  {reason}")
        lines += ["", "unclassified ops: " + (", ".join(self.unclassified) or "none")]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a PNG map: one row per decoder layer, one cell per data-path op, coloured by kind."""
        from .plot import plot_layer_map

        return plot_layer_map(self, path)

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "model_class": self.model_class,
            "model_type": self.model_type,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "granularity": self.granularity,
            "device": self.device,
            "dtype": self.dtype,
            "layers_path": self.layers_path,
            "num_layers": self.num_layers,
            "axis_sizes": self.axis_sizes,
            "versions": self.versions,
            "summary": self.summary(),
            "skipped": self.skipped,
            "module_view": self.module_view.to_dict(),
            "config": self.config,
            "records": [record.to_dict() for record in self.records],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SKReport:
        fields = {key: value for key, value in data.items() if key not in ("summary", "records", "module_view")}
        return cls(
            **fields,
            records=[OpRecord.from_dict(record) for record in data["records"]],
            module_view=ModuleView.from_dict(data["module_view"]),
        )

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SKReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

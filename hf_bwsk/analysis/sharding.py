"""A tensor-parallel sharding plan along the hidden axis: the fewest collectives per decoder layer.

The CALM count along hidden (`calm.py`) flags every op that reduces, contracts or mixes features:
an upper bound. A sharded run does better by choosing how each weight is split, as Megatron-LM
does: a *column-parallel* linear (weight split by output features) turns a replicated input into
a feature-sharded output with no communication; a *row-parallel* linear (split by input features)
turns a sharded input into partial sums. Here every tensor of the trace gets one of three states:

* ``R``, replicated: every rank holds all of it;
* ``S``, sharded along features, split by whole heads / channels (the weights' rows can always be
  permuted so that later feature splits, q/k/v or gate/value halves, stay aligned with the shards);
* ``P``, partial sums: the full value is the sum over ranks.

States propagate through the trace (`OpRecord.producers`) by these rules:

* a linear map with a weight is column-parallel (needs R, gives S) or row-parallel (needs S, gives P);
* a product of two activations (attention scores, weighted values, a scan's ``state @ C``) and
  attention kernels contract within a head or channel: local on S or R operands, S out if any is S;
* any other op that mixes features (norms, softmax over the vocabulary, reductions over features)
  needs R: S costs an all-gather, P an all-reduce;
* ops linear in their inputs (adds, scaling, views, slices, casts) carry P through (``P + R`` is
  local: one rank adds the replicated term); every other op needs its P inputs all-reduced first;
* a tensor leaving its layer must be R (so each layer's plan stands alone).

A collective converts a tensor once; every later consumer sees the converted state. An all-reduce
of a view or split of a partial sum is done on the sum itself, so its other pieces are reduced too.
The plan tries every column/row assignment of a layer's linears (at most ``MAX_EXHAUSTIVE``; a
greedy one beyond) and keeps the one with the fewest collectives, all-gathers counting after
all-reduces. Layers with the same op sequence share their plan. The backward of the same plan
needs one all-reduce per forward all-reduce (Megatron's conjugate f/g operators); only the
forward is counted.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from . import op_names
from .axes import HIDDEN
from .records import OpRecord

REPLICATED, SHARDED, PARTIAL = "R", "S", "P"
MAX_EXHAUSTIVE = 10
_WEIGHT_MATMULS = frozenset((op_names.MATMULS + " " + op_names.BIAS_MATMULS).split())
_ATTENTIONS = frozenset(op_names.ATTENTIONS.split())
_LINEAR = frozenset(
    "add sub mul div neg view _unsafe_view reshape transpose t permute unsqueeze squeeze expand select slice "
    "split split_with_sizes unbind cat stack _to_copy sum mean flip roll constant_pad_nd alias".split()
)
_RELAYOUTS = frozenset("view _unsafe_view reshape transpose t permute unsqueeze squeeze select slice split "
                       "split_with_sizes unbind".split())


def _name(record: OpRecord) -> str:
    return record.op.split(".")[1]


def _is_weight_linear(record: OpRecord) -> bool:
    return _name(record) in _WEIGHT_MATMULS and record.reason.startswith("linear map")


@dataclass(frozen=True)
class Collective:
    """One collective of the plan: ``kind`` ("all-reduce" or "all-gather") on the output of a record."""

    kind: str
    index: int
    op: str
    path_in_layer: str | None


@dataclass
class LayerPlan:
    """The placement of one segment (a decoder layer, or the ops outside the layers)."""

    layer: int | None
    linears: dict[str, str]
    collectives: list[Collective]

    @property
    def all_reduces(self) -> int:
        return sum(item.kind == "all-reduce" for item in self.collectives)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "linears": self.linears, "all_reduces": self.all_reduces,
                "collectives": [asdict(item) for item in self.collectives]}


class _Propagation:
    """One pass of the state rules over a segment's records, for one column/row assignment."""

    def __init__(self, records: list[OpRecord], canonical: dict[int, int], choices: dict[int, str]):
        self.states: dict[int, str] = {}
        self.roots: dict[int, int] = {}
        self.reduced: set[int] = set()
        self.collectives: list[tuple[str, int]] = []
        self._records = {record.index: record for record in records}
        self._canonical = canonical
        self._choices = choices
        for record in records:
            self._visit(record)

    def state(self, index: int) -> str:
        index = self._canonical.get(index, index)
        found = self.states.get(index, REPLICATED)
        if found == PARTIAL and self.roots[index] in self.reduced:
            return REPLICATED
        return found

    def _inputs(self, record: OpRecord) -> list[int]:
        return sorted({self._canonical.get(index, index) for index in record.producers} - {record.index})

    def finish(self, leaving: list[int]) -> tuple[int, int]:
        """Make the tensors leaving the segment replicated; return (collectives, all-gathers), the cost."""
        for index in leaving:
            self._to_replicated(index)
        return len(self.collectives), sum(kind == "all-gather" for kind, _ in self.collectives)

    def _to_replicated(self, index: int) -> None:
        state = self.state(index)
        if state == PARTIAL:
            root = self.roots[index]
            self.reduced.add(root)
            self.collectives.append(("all-reduce", root))
        elif state == SHARDED:
            self.states[index] = REPLICATED
            self.collectives.append(("all-gather", index))

    def _set(self, record: OpRecord, state: str, root: int | None = None) -> None:
        self.states[record.index] = state
        if state == PARTIAL:
            self.roots[record.index] = record.index if root is None else root

    def _visit(self, record: OpRecord) -> None:
        inputs = self._inputs(record)
        if not record.data_path:
            return
        if record.index in self._choices:
            self._linear(record, inputs)
        elif _name(record) in _ATTENTIONS or (_name(record) in _WEIGHT_MATMULS and not _is_weight_linear(record)):
            self._local_contraction(record, inputs)
        elif HIDDEN in record.mixes:
            for index in inputs:
                self._to_replicated(index)
            self._set(record, REPLICATED)
        else:
            self._elementwise(record, inputs)

    def _linear(self, record: OpRecord, inputs: list[int]) -> None:
        for index in inputs:
            if self._choices[record.index] == "column" or self.state(index) == PARTIAL:
                self._to_replicated(index)
        self._set(record, SHARDED if self._choices[record.index] == "column" else PARTIAL)

    def _local_contraction(self, record: OpRecord, inputs: list[int]) -> None:
        for index in inputs:
            if self.state(index) == PARTIAL:
                self._to_replicated(index)
        self._set(record, SHARDED if any(self.state(index) == SHARDED for index in inputs) else REPLICATED)

    def _elementwise(self, record: OpRecord, inputs: list[int]) -> None:
        partial = [index for index in inputs if self.state(index) == PARTIAL]
        others = {self.state(index) for index in inputs if index not in partial}
        linear = _name(record) in _LINEAR and SHARDED not in others
        if partial and linear and (len(partial) == 1 or _name(record) not in ("mul", "div")):
            relayout = _name(record) in _RELAYOUTS and len(partial) == 1
            self._set(record, PARTIAL, self.roots[partial[0]] if relayout else None)
            return
        for index in partial:
            self._to_replicated(index)
        self._set(record, SHARDED if any(self.state(index) == SHARDED for index in inputs) else REPLICATED)


def _consumed_outside(records: list[OpRecord], segment: list[OpRecord]) -> list[int]:
    """Records of the segment whose outputs some op outside it reads."""
    inside = {record.index for record in segment}
    layer = segment[0].layer
    leaving = set()
    for record in records:
        if record.layer != layer:
            leaving.update(index for index in record.producers if index in inside)
    return sorted(leaving)


def _assignments(linears: list[OpRecord]):
    if len(linears) <= MAX_EXHAUSTIVE:
        yield from itertools.product(("column", "row"), repeat=len(linears))
    else:  # alternate, as in a transformer block: column, row, column, row...
        yield tuple("column" if position % 2 == 0 else "row" for position in range(len(linears)))


def plan_segment(records: list[OpRecord], segment: list[OpRecord], canonical: dict[int, int]) -> LayerPlan:
    """The fewest-collective placement of one segment's linears (`segment`: its logical records)."""
    linears = [record for record in segment if record.data_path and _is_weight_linear(record)]
    leaving = _consumed_outside(records, segment)
    best = None
    for assignment in _assignments(linears):
        choices = {record.index: choice for record, choice in zip(linears, assignment)}
        propagation = _Propagation(segment, canonical, choices)
        cost = propagation.finish(leaving)
        if best is None or cost < best[0]:
            best = (cost, choices, propagation.collectives)
    _, choices, collectives = best
    by_index = {record.index: record for record in records}
    names: dict[str, str] = {}
    for index, choice in choices.items():
        record = by_index[index]
        where = (record.path_in_layer if record.layer is not None else record.module_path) or "<model>"
        name = f"{where} ({_name(record)})"
        names[name if name not in names else f"{name} #{index}"] = choice
    return LayerPlan(
        segment[0].layer,
        names,
        [Collective(kind, index, by_index[index].op, by_index[index].path_in_layer) for kind, index in collectives],
    )


@dataclass
class ShardingPlan:
    """The hidden-axis (tensor-parallel) plan of a whole forward: one `LayerPlan` per decoder
    layer, and one for the ops outside the layers (embedding, final norm, head, loss)."""

    layers: list[LayerPlan]
    outside: LayerPlan | None

    def layer_collectives(self) -> dict[int, int]:
        return {plan.layer: len(plan.collectives) for plan in self.layers}

    def total(self) -> int:
        return sum(len(plan.collectives) for plan in (*self.layers, *([self.outside] if self.outside else [])))

    def to_dict(self) -> dict:
        return {
            "layer_collectives": self.layer_collectives(),
            "total_collectives": self.total(),
            "layers": [plan.to_dict() for plan in self.layers],
            "outside_layers": self.outside.to_dict() if self.outside else None,
        }


def canonical_steps(records: list[OpRecord]) -> dict[int, int]:
    """Each record of a loop over the sequence -> the record of the loop's first step it repeats."""
    canonical: dict[int, int] = {}
    first, period, previous = 0, 0, None
    for record in records:
        if record.repeats > 1:
            if record.step == 0 and (previous is None or previous.repeats == 1 or previous.step > 0):
                first, period = record.index, 0
            period += record.step == 0
            canonical[record.index] = first + (record.index - first) % period
        previous = record
    return canonical


def _signature(segment: list[OpRecord]) -> tuple:
    first = segment[0].index
    return tuple((record.op, record.path_in_layer, record.reason, record.data_path, record.mixes,
                  tuple(index - first for index in record.producers)) for record in segment)


def _shifted(plan: LayerPlan, layer: int | None, offset: int) -> LayerPlan:
    moved = [Collective(item.kind, item.index + offset, item.op, item.path_in_layer) for item in plan.collectives]
    return LayerPlan(layer, dict(plan.linears), moved)


def hidden_plan(records: list[OpRecord], num_layers: int) -> ShardingPlan:
    """The fewest-collective tensor-parallel placement of every layer of a traced forward
    (`records`: every record, ``records[i].index == i``)."""
    canonical = canonical_steps(records)
    segments: dict[int | None, list[OpRecord]] = {}
    for record in records:
        if record.is_logical:
            segments.setdefault(record.layer, []).append(record)
    layers, seen = [], {}
    for layer in range(num_layers):
        segment = segments.get(layer)
        if not segment:
            continue
        signature = _signature(segment)
        if signature in seen:
            plan, first = seen[signature]
            layers.append(_shifted(plan, layer, segment[0].index - first))
            continue
        plan = plan_segment(records, segment, canonical)
        seen[signature] = (plan, segment[0].index)
        layers.append(plan)
    outside = segments.get(None)
    return ShardingPlan(layers, plan_segment(records, outside, canonical) if outside else None)

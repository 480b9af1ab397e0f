"""Which activations the decoder layers keep for backward and which they recompute, from the analysis.

The plan is read off the analysis' own records (`hf_bwsk.analysis.trace`): their S/K kinds, their
data flow (`OpRecord.producers`), widths and FLOPs. Ops are keyed by `OpKey` = (layer index, module
path relative to the layer, op name, occurrence of that (path, op) pair within the layer call), the
key a checkpoint policy can rebuild at run time from module hooks alone. Global op ordinals would
not do: the checkpointed step and the trace take different aten paths around identities, and
recurrent scans run one op group per token, so ordinals shift; a (module, op, occurrence) key is
stable across them for every op outside such loops.

Under selective activation checkpointing every op in a layer is either kept (its output cached in
the forward) or recomputed in backward from the layer input and the kept outputs. The cost of a
plan is the bytes it keeps and the FLOPs it recomputes. Cheap element-wise and view ops cost ~0
FLOPs to recompute, so they always are. The choice is about the expensive ops (matmuls,
convolutions, attention):

* Default plan, from the S/K analysis: keep every expensive output except that of a *widening* op
  (more output elements than activation input elements) whose output flows, through S ops and
  pure relabelling (views, copies), into a K op. A K op erases information, so its backward needs
  the wide tensor itself; recomputing the widening op from its narrow input costs one matmul and
  frees the wide tensor (e.g. the 4h-wide MLP up-projection before GELU, or the T x T attention
  scores before softmax). Narrowing or equal-width contractions and attention outputs are cheap to
  keep and expensive to recompute, so they are kept; a widening op that feeds attention or a gate
  (Gray) is kept too, since its consumer needs it anyway.

  Not every op with FLOPs is worth its bytes, though: keeping an output saves its FLOPs per element
  of recompute and costs its bytes, so what matters is FLOPs per output element (2 x the contraction
  length of a matmul). The layer's own projections of its d-wide input cost 2d per element; that is
  the exchange rate the layer sets. An op below d FLOPs per element (contracting over less than half
  the layer width) is *narrow*: it frees bytes at under half that price, so it is recomputed like
  a cheap op, whatever its kind. This catches the ops that contract over an inner, small dimension
  rather than the model width: Mamba's depthwise conv (kernel 4), its low-rank dt projection
  (dt_rank = d/16) and the per-token state contractions of its reference scan (state 16), which
  together held most of what the plan kept, and attention over a context much shorter than the
  width. Contractions over the layer width (attention and MLP projections, attention at context
  >= d/2) stay above it, so transformer plans do not change. The width comes from the layer
  input (`hidden_size`); without it no op counts as narrow.

  An op the analysis has no rule and no FLOP formula for (a custom kernel: flash-attention-2, a
  kernel loaded from the Hub) may be as costly as attention: on the data path it counts as
  *unknown* and is kept, never recomputed as if it were cheap. Known cheap ops (`known_cheap`:
  every aten op the S/K rules know, matmul, convolution and attention families aside) are
  recomputed.
* Skipped ops, in both plans: a matmul whose output backward never reads needs neither keeping nor
  recomputing. A matmul's backward reads its inputs only; if its output flows, through views, casts
  and additions (`PASS_THROUGH`: ops whose backward reads none of their inputs), only into the
  layer's output, then no op that backward needs is computed from it, and the recompute may hand
  back a tensor of its shape without running it (`scoped.ScopedExecution` does; torch's per-op
  selective checkpointing can only keep or recompute, so plans for it are made without skips). The
  last projection of a layer writing into the residual stream is one: GPT-NeoX's attention output
  and MLP down-projection (parallel residual), Llama's and Mamba's down/out projection. A dropout in
  between (GPT-2, OPT in training) saves its mask and keeps the op out.
  The last of them in a layer, when only such ops follow it (`unreached_by_recompute`), the recompute
  never reaches at all: torch's non-reentrant checkpoint stops recomputing once it has saved again
  every tensor the forward saved (its default `early_stop`), and a matmul saves its inputs before it
  computes. It needs no handling at run time (`RecomputePlan.unreached`).
* Budget plan: start from full recomputation (only the layer inputs are kept, as HF activation
  checkpointing does) and keep the expensive outputs that save the most recompute FLOPs per byte
  until the byte budget is full (greedy knapsack). Among outputs of equal worth (every projection
  of the layer width saves the same FLOPs per byte) a later layer's go first: backward frees them
  sooner, and the last layer's are alive at its own backward, the step's peak, kept or not; what it
  keeps costs only while the loss runs. So at the default plan's bytes and FLOPs, a budget plan
  keeping the last layer's widening outputs in place of as many bytes of earlier layers peaks lower.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from ..analysis import op_names
from ..analysis.records import OpRecord
from ..analysis.rules import RULES
from ..analysis.steps import group_sequence_loops
from ..errors import BWSKError

# How `RecomputePlan.summary` names the body op of a loop over the sequence: counted once per loop,
# whatever the number of steps (given beside it, under "recomputed_loop_steps").
PER_STEP = " per step"

# Ops whose backward reads none of their inputs' values: a value flowing only through them (and views,
# casts) into the layer's output is read by nothing backward needs.
PASS_THROUGH = frozenset(
    "aten.add.Tensor aten.add_.Tensor aten.sub.Tensor aten.sub_.Tensor aten.mul.Scalar aten.div.Scalar".split()
)
# Ops whose backward reads their inputs only, never their output: the ones a recompute may skip.
_SKIPPABLE_FAMILIES = frozenset(f"{op_names.MATMULS} {op_names.BIAS_MATMULS}".split())

# Op families that cost FLOPs per element on the order of the layer width: never cheap.
_COSTLY_FAMILIES = frozenset(
    f"{op_names.MATMULS} {op_names.BIAS_MATMULS} {op_names.CONVOLUTIONS} {op_names.ATTENTIONS}".split()
)


class OpKey(NamedTuple):
    layer: int
    path: str
    op: str
    occurrence: int


@dataclass(frozen=True)
class RecomputePlan:
    """Keep/recompute/skip decisions for the expensive ops of every decoder layer, with their cost.

    ``skip``: ops neither kept nor recomputed (their output is read by nothing backward needs; module
    docstring); ``skipped_bytes``: what keeping them would cost; ``unreached``: the skipped ops that
    the checkpoint's recompute stops before, so that no execution needs to skip them.
    """

    keep: frozenset[OpKey]
    recompute: frozenset[OpKey]
    keep_unseen_expensive: bool
    kept_bytes: int
    minimum_bytes: int
    keep_all_bytes: int
    recompute_flops: int
    layer_flops: int
    budget_bytes: int | None = None
    # Loops over the sequence (`hf_bwsk.analysis.steps`), for the summary: the key of each loop op's
    # first step with the loop's number of steps, and the keys of the later steps.
    loop_steps: tuple[tuple[OpKey, int], ...] = ()
    later_steps: frozenset[OpKey] = frozenset()
    skip: frozenset[OpKey] = frozenset()
    skipped_bytes: int = 0
    unreached: frozenset[OpKey] = frozenset()

    def decision(self, key: OpKey) -> bool | None:
        """Keep (True) or recompute (False) as planned, or None for a key the plan does not hold.

        A skipped op counts as kept here: where it is not skipped, keeping it is what frees the recompute.
        """
        if key in self.keep or key in self.skip:
            return True
        if key in self.recompute:
            return False
        return None

    def keeps(self, key: OpKey, expensive: bool) -> bool:
        """Whether the op's output is kept for backward (otherwise it is recomputed).

        ``expensive``: the op is not known cheap (it has a FLOP formula, or the analysis does not
        know it); an unseen expensive op is kept by the default plan, recomputed by a budget plan.
        """
        planned = self.decision(key)
        if planned is not None:
            return planned
        return expensive and self.keep_unseen_expensive

    def summary(self) -> dict:
        """JSON-ready description: estimated bytes kept, recompute FLOPs share, recomputed ops.

        ``recomputed_ops`` counts logical ops, ``"path:op"`` -> how many (over all layers): an op
        in the body of a loop over the sequence (a reference scan's per-token step) counts once per
        loop, named ``"path:op per step"``, with its loop's number of steps in
        ``recomputed_loop_steps``; so the list does not grow with the sequence length. ``skipped_ops``
        names the ops neither kept nor recomputed alike, ``skipped_bytes`` what keeping them would cost.
        """
        recomputed, recomputed_steps = self._grouped(self.recompute)
        skipped = self._grouped(self.skip)[0]
        return {
            "policy": "budget" if self.budget_bytes is not None else "analysis",
            "budget_bytes": self.budget_bytes,
            "kept_bytes_estimate": self.kept_bytes,
            "minimum_bytes": self.minimum_bytes,
            "keep_all_matmuls_bytes": self.keep_all_bytes,
            "recompute_flops_fraction": self.recompute_flops / self.layer_flops if self.layer_flops else 0.0,
            "recomputed_ops": recomputed,
            "recomputed_loop_steps": recomputed_steps,
            "skipped_ops": skipped,
            "skipped_bytes": self.skipped_bytes,
        }

    def _grouped(self, keys: frozenset[OpKey]) -> tuple[dict[str, int], dict[str, int | list[int]]]:
        """``"path:op"`` -> count over the layers, a loop's body once (see `summary`); and the loops' steps."""
        loops = dict(self.loop_steps)
        counts: Counter = Counter()
        steps: dict[str, set[int]] = defaultdict(set)
        for key in keys:
            if key in self.later_steps:
                continue
            name = f"{key.path or '<layer>'}:{key.op}"
            if key in loops:
                name += PER_STEP
                steps[name].add(loops[key])
            counts[name] += 1
        return (dict(sorted(counts.items())),
                {name: min(found) if len(found) == 1 else sorted(found) for name, found in sorted(steps.items())})


def known_cheap(op: str) -> bool:
    """Whether an op (``"aten.add.Tensor"``) is one the analysis knows and costs ~0 FLOPs to recompute.

    Profiler markers (``profiler._record_function_enter_new``, which FSDP2's hooks run) make no data."""
    if op.startswith("profiler."):
        return True
    packet = _family(op)
    return packet in RULES and packet not in _COSTLY_FAMILIES


def _unknown(record: OpRecord) -> bool:
    """An op on the data path with no FLOP formula that the analysis does not know: maybe costly."""
    return record.flops == 0 and record.data_path and not known_cheap(record.op)


def layer_ops(records: list[OpRecord]) -> dict[int, OpKey]:
    """The `OpKey` of every record run inside a decoder layer, by record index.

    Occurrences count per layer call, so the records must come from one forward (each layer once).
    """
    seen: Counter = Counter()
    keys = {}
    for record in records:
        if record.layer is None:
            continue
        group = (record.layer, record.path_in_layer or "", record.op)
        keys[record.index] = OpKey(*group, seen[group])
        seen[group] += 1
    return keys


def feeds_k_op(records: dict[int, OpRecord], consumers: dict[int, list[int]], index: int) -> bool:
    """Whether record `index`'s output reaches a K op through S ops and views/casts only."""
    pending, seen = list(consumers[index]), set()
    while pending:
        consumer = pending.pop()
        if consumer in seen:
            continue
        seen.add(consumer)
        record = records[consumer]
        # Relabelling ops carry the tensor on whatever the analysis calls them (a split is lossless
        # taken together, though each slice alone drops elements).
        if record.relabels or (record.kind == "S" and record.flops == 0):
            pending.extend(consumers[consumer])
        elif record.kind == "K":
            return True
    return False


def unread_outputs(records: dict[int, OpRecord], consumers: dict[int, list[int]]) -> set[int]:
    """The matmuls among ``records`` whose output backward never reads (see the module docstring).

    A value is unread when every op consuming it is a view, a cast or a `PASS_THROUGH` op whose own
    output is unread, down to the layer's output (an op nothing in the layer consumes). A matmul
    counts only with consumers of its own: without data flow (records saved before it was traced)
    nothing is skipped.
    """
    # Within its layer call only: the next layer consuming this one's output is another checkpoint.
    inside = {index: [c for c in consumers[index] if records[c].layer == record.layer]
              for index, record in records.items()}
    # Consumers run after their producers: deciding in reverse order sees every consumer decided.
    unread: set[int] = set()
    for index in sorted(records, reverse=True):
        record = records[index]
        if (record.relabels or record.op in PASS_THROUGH) and all(c in unread for c in inside[index]):
            unread.add(index)
    return {
        index for index, record in records.items()
        if _family(record.op) in _SKIPPABLE_FAMILIES and len(record.output_shapes) == 1
        and inside[index] and all(c in unread for c in inside[index])
    }


def unreached_by_recompute(records: dict[int, OpRecord]) -> set[int]:
    """Per layer, the last op that saves anything for backward, when it is a matmul (see the module docstring).

    Views, casts and `PASS_THROUGH` ops save nothing; the op before a layer's tail of them saves the
    last tensors backward reads, and a matmul saves its inputs before computing, so a checkpoint's
    recompute (with its default early stop) ends before running it.
    """
    last: dict[int, int] = {}
    for index in sorted(records):
        record = records[index]
        if not (record.relabels or record.op in PASS_THROUGH):
            last[record.layer] = index
    return {index for index in last.values()
            if _family(records[index].op) in _SKIPPABLE_FAMILIES and len(records[index].output_shapes) == 1}


def _family(op: str) -> str:
    """The aten packet of an op name (``"aten.addmm.default"`` -> ``"addmm"``); '' for other namespaces."""
    namespace, _, rest = op.partition(".")
    return rest.split(".", 1)[0] if namespace == "aten" else ""


def _widens(record: OpRecord) -> bool:
    return 0 < record.activation_input_numel < sum(_numel(shape) for shape in record.output_shapes)


def _narrow(record: OpRecord, hidden_size: int | None) -> bool:
    """Whether the op spends fewer FLOPs per output element than the layer width (see the module docstring)."""
    if not hidden_size:
        return False
    elements = sum(_numel(shape) for shape in record.output_shapes)
    return elements > 0 and record.flops < hidden_size * elements


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def plan_recompute(
    records: list[OpRecord],
    layer_input_bytes: list[int],
    budget_bytes: int | None = None,
    *,
    batch_size: int = 1,
    hidden_size: int | None = None,
    skip_unread: bool = True,
) -> RecomputePlan:
    """The plan for the records of one traced forward (see the module docstring).

    Only records inside the decoder layers take part; the data flow is followed within them. The
    records may trace one sequence of a `batch_size` batch (`layer_input_bytes` too): bytes are
    scaled to the batch. A `budget_bytes` below the layer inputs (the least any checkpointing
    keeps) is a `BWSKError`. `hidden_size` (the width of the layers' input) sets the narrow-op
    threshold of the default plan. ``skip_unread=False`` plans for an execution that cannot skip ops
    (torch's per-op selective checkpointing): their outputs are then candidates like any other.
    Loops over the sequence are marked in ``records`` (as the analysis marks them) for the plan's
    summary; the decisions do not depend on them.
    """
    keys = layer_ops(records)
    length = _traced_length(records)
    if length is not None:
        group_sequence_loops(records, length)
    by_index = {record.index: record for record in records if record.index in keys}
    consumers: dict[int, list[int]] = defaultdict(list)
    for record in by_index.values():
        for producer in record.producers:
            if producer in by_index:
                consumers[producer].append(record.index)
    unknown = {index for index, record in by_index.items() if _unknown(record)}
    expensive = [index for index, record in by_index.items() if record.flops > 0 or index in unknown]
    size = {index: by_index[index].output_bytes * batch_size for index in expensive}
    minimum = sum(layer_input_bytes) * batch_size
    keep_all = minimum + sum(size.values())
    layer_flops = sum(by_index[i].flops for i in expensive)
    skip = unread_outputs(by_index, consumers) & set(expensive) if skip_unread else set()
    unreached = unreached_by_recompute(by_index) & skip
    expensive = [index for index in expensive if index not in skip]
    if budget_bytes is None:
        recompute = {
            i for i in expensive
            if i not in unknown
            and (_narrow(by_index[i], hidden_size) or (_widens(by_index[i]) and feeds_k_op(by_index, consumers, i)))
        }
        keep = [i for i in expensive if i not in recompute]
        keep_unseen = True
    else:
        if budget_bytes < minimum:
            raise BWSKError(
                f"bwsk_activation_budget {budget_bytes:,} bytes is below the minimum {minimum:,} bytes (the decoder-layer "
                "inputs of this batch, kept even when everything is recomputed): raise it to at least that"
            )
        keep, spent = [], minimum
        # Among outputs of equal worth, a later layer's first: backward frees it sooner, and the last
        # layer's outputs are alive at its own backward (the peak) whether kept or recomputed.
        for i in sorted(expensive, key=lambda i: (-by_index[i].flops / max(size[i], 1), -by_index[i].layer)):
            if spent + size[i] <= budget_bytes:
                keep.append(i)
                spent += size[i]
        recompute = set(expensive) - set(keep)
        keep_unseen = False
    return RecomputePlan(
        keep=frozenset(keys[i] for i in keep),
        recompute=frozenset(keys[i] for i in recompute),
        keep_unseen_expensive=keep_unseen,
        kept_bytes=minimum + sum(size[i] for i in keep),
        minimum_bytes=minimum,
        keep_all_bytes=keep_all,
        recompute_flops=sum(by_index[i].flops for i in recompute),
        layer_flops=layer_flops,
        budget_bytes=budget_bytes,
        loop_steps=tuple((keys[r.index], r.repeats) for r in by_index.values() if r.repeats > 1 and r.step == 0),
        later_steps=frozenset(keys[r.index] for r in by_index.values() if r.step > 0),
        skip=frozenset(keys[i] for i in skip),
        skipped_bytes=sum(size[i] for i in skip),
        unreached=frozenset(keys[i] for i in unreached),
    )


def _traced_length(records: list[OpRecord]) -> int | None:
    """The sequence length of the traced forward: the second dimension of the first data-path op's
    output (the embedding lookup of the (batch, sequence) token ids, in every HF causal LM)."""
    first = next((record for record in records if record.data_path and record.output_shapes), None)
    if first is None or len(first.output_shapes[0]) < 2:
        return None
    return first.output_shapes[0][1]

"""Which activations the decoder layers keep for backward and which they recompute, from the analysis.

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
* Budget plan: start from full recomputation (only the layer inputs are kept, as HF activation
  checkpointing does) and keep the expensive outputs that save the most recompute FLOPs per byte
  until the byte budget is full (greedy knapsack).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .errors import BWSKError
from .layer_trace import LayerOp, OpKey


@dataclass(frozen=True)
class RecomputePlan:
    """Keep/recompute decisions for the expensive ops of every decoder layer, with their cost."""

    keep: frozenset[OpKey]
    recompute: frozenset[OpKey]
    keep_unseen_expensive: bool
    kept_bytes: int
    minimum_bytes: int
    keep_all_bytes: int
    recompute_flops: int
    layer_flops: int
    budget_bytes: int | None = None

    def keeps(self, key: OpKey, expensive: bool) -> bool:
        """Whether the op's output is kept for backward (otherwise it is recomputed)."""
        if key in self.keep:
            return True
        if key in self.recompute:
            return False
        return expensive and self.keep_unseen_expensive

    def summary(self) -> dict:
        """JSON-ready description: estimated bytes kept, recompute FLOPs share, recomputed ops."""
        recomputed = Counter(f"{key.path or '<layer>'}:{key.op}" for key in self.recompute)
        return {
            "policy": "budget" if self.budget_bytes is not None else "analysis",
            "budget_bytes": self.budget_bytes,
            "kept_bytes_estimate": self.kept_bytes,
            "minimum_bytes": self.minimum_bytes,
            "keep_all_matmuls_bytes": self.keep_all_bytes,
            "recompute_flops_fraction": self.recompute_flops / self.layer_flops if self.layer_flops else 0.0,
            "recomputed_ops": dict(sorted(recomputed.items())),
        }


def feeds_k_op(ops: list[LayerOp], index: int, kinds: dict[OpKey, str]) -> bool:
    """Whether op `index`'s output reaches a K op through S ops and views/copies only."""
    pending, seen = list(ops[index].consumers), set()
    while pending:
        consumer = pending.pop()
        if consumer in seen:
            continue
        seen.add(consumer)
        op = ops[consumer]
        kind = kinds.get(op.key)
        # Relabelling ops carry the tensor on whatever the analysis calls them (a split is lossless
        # taken together, though each slice alone drops elements).
        if op.structural:
            pending.extend(op.consumers)
        elif kind == "K":
            return True
        elif kind == "S" and not op.expensive:
            pending.extend(op.consumers)
    return False


def _widens(op: LayerOp) -> bool:
    return 0 < op.activation_input_numel < op.output_numel


def plan_recompute(
    ops: list[LayerOp], layer_input_bytes: list[int], kinds: dict[OpKey, str], budget_bytes: int | None = None
) -> RecomputePlan:
    """The plan for ops traced by `layer_trace.trace_layer_ops` (see the module docstring).

    `kinds` maps op keys to the analysis' "S"/"K"/"Gray"; keys it lacks count as unknown. A
    `budget_bytes` below the layer inputs (the least any checkpointing keeps) is a `BWSKError`.
    """
    expensive = [i for i, op in enumerate(ops) if op.expensive]
    minimum = sum(layer_input_bytes)
    keep_all = minimum + sum(ops[i].output_bytes for i in expensive)
    layer_flops = sum(ops[i].flops for i in expensive)
    if budget_bytes is None:
        recompute = {i for i in expensive if _widens(ops[i]) and feeds_k_op(ops, i, kinds)}
        keep = [i for i in expensive if i not in recompute]
        keep_unseen = True
    else:
        if budget_bytes < minimum:
            raise BWSKError(
                f"bwsk_memory_budget {budget_bytes:,} bytes is below the minimum {minimum:,} bytes (the decoder-layer "
                "inputs of this batch, kept even when everything is recomputed): raise it to at least that"
            )
        keep, spent = [], minimum
        for i in sorted(expensive, key=lambda i: -ops[i].flops / max(ops[i].output_bytes, 1)):
            if spent + ops[i].output_bytes <= budget_bytes:
                keep.append(i)
                spent += ops[i].output_bytes
        recompute = set(expensive) - set(keep)
        keep_unseen = False
    return RecomputePlan(
        keep=frozenset(ops[i].key for i in keep),
        recompute=frozenset(ops[i].key for i in recompute),
        keep_unseen_expensive=keep_unseen,
        kept_bytes=minimum + sum(ops[i].output_bytes for i in keep),
        minimum_bytes=minimum,
        keep_all_bytes=keep_all,
        recompute_flops=sum(ops[i].flops for i in recompute),
        layer_flops=layer_flops,
        budget_bytes=budget_bytes,
    )

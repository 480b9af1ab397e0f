"""The run-time half of the reversible mode: which op is running where, and keep-or-recompute per op.

Selective activation checkpointing asks a policy about every aten op of a checkpointed layer. The
policy rebuilds the op's `OpKey` (layer, module path in the layer, op, occurrence) from module hooks
and answers what the `RecomputePlan` says, counting how often it could (`SelectivePolicy.fidelity`).
The policy runs for every op of every checkpointed layer's forward (and recompute, on torch 2.11), so
what it needs per aten overload (name, cost class) is computed once, and a decision is one dict lookup.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from ..analysis.trace import flop_formula
from .plan import OpKey, RecomputePlan, known_cheap

# The planned decision of a skipped op (`RecomputePlan.skip`): neither kept nor recomputed. Truthy, so
# that code asking only "keep?" keeps it, which is what an execution unable to skip must do.
SKIP = "skip"


class OpCosts(dict):
    """Per aten overload: its name in plan keys and whether it is expensive, worked out on first sight.

    Both executions ask this for every op they see; ``str(func)`` alone costs ~3 us a call.
    """

    def __missing__(self, func) -> tuple[str, bool]:
        name = str(func)
        self[func] = found = (name, flop_formula(func) is not None or not known_cheap(name))
        return found


def push_path(stack: list[str], path: str):
    """A forward pre-hook pushing ``path`` on ``stack`` (the module path of the innermost running module)."""

    def hook(module, args):
        stack.append(path)

    return hook


def pop_path(stack: list[str]):
    """The forward hook (``always_call=True``) undoing `push_path`."""

    def hook(module, args, output):
        if stack:
            stack.pop()

    return hook


class LayerPathTracker:
    """Knows, while a forward runs, which decoder layer and which of its submodules is executing.

    The checkpoint policy sees only aten ops; these hooks give it the rest of an `OpKey` in the forward
    (a recompute replays the forward's decisions: `SelectivePolicy.layer_policy`). Hooks are registered
    on every submodule of every layer; `remove()` takes them all away again.
    """

    def __init__(self, layers: torch.nn.ModuleList):
        self.layer: int | None = None
        self._stack: list[str] = []
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._layer_post_hook, always_call=True))
            pop = pop_path(self._stack)
            for name, module in layer.named_modules():
                if name:
                    self._handles.append(module.register_forward_pre_hook(push_path(self._stack, name)))
                    self._handles.append(module.register_forward_hook(pop, always_call=True))

    @property
    def path(self) -> str:
        """Module path of the innermost running submodule, relative to its layer ('' = the layer itself)."""
        return self._stack[-1] if self._stack else ""

    def _layer_pre_hook(self, index):
        def hook(module, args):
            self.layer = index
            self._stack.clear()

        return hook

    def _layer_post_hook(self, module, args, output):
        self.layer = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PlanDecisions:
    """What both executions of a plan share (`SelectivePolicy` per op, `scoped.ScopedExecution`).

    ``plan`` (settable), looked up as one dict lookup per op by plain tuple (an OpKey hashes and
    compares as its tuple) giving True (keep), False (recompute) or `SKIP`; the per-overload op costs; the live ``fidelity`` counts shown in the
    mode's status (``plan_hits``, ``plan_misses``, ``cheap_by_rule``, ``outside_layer``, the ``first_misses``); the
    optional ``decisions`` dict of forward decisions by key (for tests; off by default as it grows
    with every step); and one warning per kind of trouble.
    """

    def __init__(self, plan: RecomputePlan):
        self.fidelity: dict = {"plan_hits": 0, "plan_misses": 0, "cheap_by_rule": 0, "outside_layer": 0,
                               "first_misses": []}
        self.decisions: dict[OpKey, bool] | None = None
        self._ops = OpCosts()
        self._warned: set[str] = set()
        self.plan = plan

        def context_fn():
            return self.layer_contexts()

        # What `torch.utils.checkpoint` is handed: a plain function, the one kind of `context_fn` (beside a
        # partial of constants) that dynamo traces under `torch.compile` on torch 2.11-2.14.
        self.context_fn = context_fn

    def layer_contexts(self) -> tuple:
        """The (forward, recompute) context managers of one checkpointed layer call."""
        raise NotImplementedError

    @property
    def plan(self) -> RecomputePlan:
        return self._plan

    @plan.setter
    def plan(self, plan: RecomputePlan) -> None:
        self._plan = plan
        self._planned = {**dict.fromkeys(plan.recompute, False), **dict.fromkeys(plan.keep, True),
                         **dict.fromkeys(plan.skip, SKIP)}

    def _count_unplanned(self, key: OpKey, expensive: bool, keep: bool) -> None:
        """An op whose key the plan lacks: cheap by rule, or a miss decided by `RecomputePlan.keeps`' rule."""
        if not expensive:
            self.fidelity["cheap_by_rule"] += 1
            return
        self._count_miss(f"{key.layer}:{key.path or '<layer>'}:{key.op}#{key.occurrence}", "miss",
                         f"bwsk reversible mode: {key.op} (layer {key.layer}, '{key.path}', occurrence "
                         f"{key.occurrence}) is not in the recompute plan (the first batch's trace never ran it); "
                         f"{'kept' if keep else 'recomputed'} by rule; counts in the status' plan_fidelity")

    def _count_miss(self, entry: str, topic: str, message: str) -> None:
        self.fidelity["plan_misses"] += 1
        if len(self.fidelity["first_misses"]) < 10:
            self.fidelity["first_misses"].append(entry)
        self._warn_once(topic, message)

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, UserWarning, stacklevel=2)


class SelectivePolicy(PlanDecisions):
    """Per-op execution of a plan: its `context_fn` gives each layer call a selective-checkpoint context.

    The layer index and the module path of each op come from the tracker's hooks, read per op:
    transformers 5.23 checkpoints a layer's `forward` (its hooks have run when the checkpoint
    starts), 5.17 its `__call__` (the hooks run inside the checkpoint). A recompute that asks the policy
    again (torch 2.11) gets the forward's answers, by op overload and call index (`layer_policy`).

    Plan fidelity: every forward decision is counted in ``fidelity`` (a live dict, shown in the
    mode's status): ``plan_hits`` (the plan held the op's key), ``plan_misses`` (an op that is not
    known cheap and whose key the plan lacks: decided by `RecomputePlan.keeps`' rule),
    ``cheap_by_rule`` (known cheap ops outside the plan, recomputed) and ``outside_layer`` (ops of the
    checkpointed call before the layer's own pre-hook, as a wrapper's hook: recomputed). The first miss,
    and a matmul run with no layer index, warn once. ``decisions``, when set to a dict, records every forward
    decision by key (for tests; off by default as it grows with every step).
    """

    execution = "per_op"

    def __init__(self, plan: RecomputePlan, tracker: LayerPathTracker):
        super().__init__(plan)
        self.tracker = tracker

    def layer_contexts(self) -> tuple:
        return create_selective_checkpoint_contexts(self.layer_policy())

    def layer_policy(self):
        """The per-op policy function of one layer call (torch's `policy_fn(ctx, func, *args, **kwargs)`)."""
        occurrences: dict[tuple[str, str], int] = {}
        # The forward's decisions per op overload, in call order. torch 2.11 asks the policy again while
        # recomputing (2.13+ replays the forward's decisions by overload and call index itself): it gets
        # the same answers by the same index. transformers 5.23+ recomputes outside the layer's hooks (no
        # layer index then); 5.17 checkpoints `__call__`, where a wrapper's hooks (FSDP2's unshard) run
        # before the layer's own, in the forward and maybe not in the recompute: those ops are recomputed
        # and take no index, in the forward and in the recompute alike.
        forward_decisions: dict = {}
        recompute_calls: dict = {}
        wrapper_ops = False  # whether an op of this call ran before the layer's pre-hook

        def policy(ctx, func, *args, **kwargs):
            nonlocal wrapper_ops
            layer = self.tracker.layer
            if ctx.is_recompute:
                if wrapper_ops and layer is None:
                    return CheckpointPolicy.PREFER_RECOMPUTE
                index = recompute_calls.get(func, 0)
                recompute_calls[func] = index + 1
                decided = forward_decisions.get(func, ())
                keep = decided[index] if index < len(decided) else False
                return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
            if layer is None:
                wrapper_ops = True
                return self._outside_layer(func)
            name, expensive = self._ops[func]
            path = self.tracker.path
            group = (path, name)
            occurrence = occurrences.get(group, 0)
            occurrences[group] = occurrence + 1
            keep = self._planned.get((layer, path, name, occurrence))
            if keep is None:
                key = OpKey(layer, path, name, occurrence)
                keep = self._plan.keeps(key, expensive)
                self._count_unplanned(key, expensive, keep)
            else:
                self.fidelity["plan_hits"] += 1
            if self.decisions is not None:
                self.decisions[OpKey(layer, path, name, occurrence)] = keep
            forward_decisions.setdefault(func, []).append(keep)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return policy

    def _outside_layer(self, func):
        """An op of the checkpointed call that runs before the layer's own pre-hook: recomputed, as plain
        checkpointing would (FSDP2's unshard under transformers 5.17, which checkpoints `__call__`)."""
        self.fidelity["outside_layer"] += 1
        if flop_formula(func) is not None:  # a matmul or attention outside any layer: the hooks never ran
            self._warn_once("layer", "bwsk reversible mode: a checkpointed matmul ran with no layer index (the "
                            "decoder-layer hooks did not run): the plan cannot apply, it is recomputed")
        return CheckpointPolicy.PREFER_RECOMPUTE

"""The run-time half of the reversible mode: which op is running where, and keep-or-recompute per op.

Selective activation checkpointing asks a policy about every aten op of a checkpointed layer. The
policy rebuilds the op's `OpKey` (layer, module path in the layer, op, occurrence) from module hooks
and answers what the `RecomputePlan` says.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from ..analysis.trace import flop_formula
from .plan import OpKey, RecomputePlan


class LayerPathTracker:
    """Knows, while a forward runs, which decoder layer and which of its submodules is executing.

    The checkpoint policy sees only aten ops; these hooks give it the rest of an `OpKey`. Forward
    hooks also fire while checkpointing recomputes a layer, so the keys agree between the forward
    and the recompute. Hooks are registered on every submodule of every layer; `remove()` takes
    them all away again.
    """

    def __init__(self, layers: torch.nn.ModuleList):
        self.layer: int | None = None
        self._stack: list[str] = []
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._layer_post_hook, always_call=True))
            for name, module in layer.named_modules():
                if name:
                    self._handles.append(module.register_forward_pre_hook(self._push(name)))
                    self._handles.append(module.register_forward_hook(self._pop, always_call=True))

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

    def _push(self, name):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class SelectivePolicy:
    """`context_fn` for `torch.utils.checkpoint`: one selective-checkpoint context per layer call.

    The layer index and the module path of each op come from the tracker's hooks, read per op:
    transformers 5.23 checkpoints a layer's `forward` (its hooks have run when the checkpoint
    starts), 5.17 its `__call__` (the hooks run inside the checkpoint). Occurrences are counted separately for
    the forward and the recompute, so torch versions that ask the policy again while recomputing
    get the same answers.
    """

    def __init__(self, plan: RecomputePlan, tracker: LayerPathTracker):
        self.plan = plan
        self.tracker = tracker

    def __call__(self):
        counts = {False: Counter(), True: Counter()}

        def policy(ctx, func, *args, **kwargs):
            path, name = self.tracker.path, str(func)
            seen = counts[ctx.is_recompute]
            occurrence = seen[(path, name)]
            seen[(path, name)] += 1
            keep = self.plan.keeps(OpKey(self.tracker.layer, path, name, occurrence), flop_formula(func) is not None)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

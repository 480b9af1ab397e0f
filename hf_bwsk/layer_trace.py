"""Data flow of the ops inside a model's decoder layers, keyed the way a checkpoint policy sees them.

The S/K report classifies ops; a keep/recompute plan also needs to know who consumes whom, how wide
each op's output is against its activation inputs, and what it costs. `trace_layer_ops` runs one
forward under a `TorchDispatchMode` and records exactly that.

Ops are keyed by `OpKey` = (layer index, module path relative to the layer, op name, occurrence of
that (path, op) pair within the layer call). Global op ordinals would not do: a real run and a trace
take different aten paths around attention, and recurrent scans run one op group per token, so
ordinals shift with the sequence length; a (module, op, occurrence) key is stable across them for
every op outside such loops. The module path comes from forward pre/post hooks
(`LayerPathTracker`), which also fire while checkpointing recomputes a layer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

# Ops that only relabel or copy memory: they carry information through unchanged.
_STRUCTURAL_OPS = {
    torch.ops.aten.clone.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.lift_fresh.default,
}


class OpKey(NamedTuple):
    layer: int
    path: str
    op: str
    occurrence: int


@dataclass
class LayerOp:
    """One op executed inside a decoder layer."""

    key: OpKey
    flops: int
    output_bytes: int
    output_numel: int
    activation_input_numel: int
    structural: bool
    consumers: list[int] = field(default_factory=list)

    @property
    def expensive(self) -> bool:
        """A matmul/attention op: worth keeping rather than recomputing."""
        return self.flops > 0


def is_expensive(func) -> bool:
    """Whether torch counts FLOPs for this op (matmuls, convolutions, attention)."""
    return func._overloadpacket in flop_registry


class LayerPathTracker:
    """Knows, while a forward runs, which decoder layer and which of its submodules is executing.

    Hooks are registered on every submodule of every layer; `remove()` takes them all away again.
    `on_layer_start(index, args)` is called from each layer's forward pre-hook.
    """

    def __init__(self, layers: torch.nn.ModuleList, on_layer_start: Callable[[int, tuple], None] | None = None):
        self.layer: int | None = None
        self._stack: list[str] = []
        self._on_layer_start = on_layer_start
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
            if self._on_layer_start is not None:
                self._on_layer_start(index, args)

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


class _DataFlowRecorder(TorchDispatchMode):
    def __init__(self, tracker: LayerPathTracker):
        super().__init__()
        self.tracker = tracker
        self.ops: list[LayerOp] = []
        self.counts: Counter = Counter()
        self.producer = WeakIdKeyDictionary()  # tensor -> index of the op that produced it
        self.activations = WeakIdKeyDictionary()  # tensors derived from a layer's hidden-state input

    def start_layer(self, index, args):
        self.counts.clear()
        for tensor in args:
            if isinstance(tensor, torch.Tensor):
                self.activations[tensor] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        layer = self.tracker.layer
        if layer is None:
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        path, name = self.tracker.path, str(func)
        occurrence = self.counts[(path, name)]
        self.counts[(path, name)] += 1
        is_activation = [t in self.activations for t in inputs]
        structural = func.is_view or func in _STRUCTURAL_OPS
        count_flops = flop_registry.get(func._overloadpacket)
        index = len(self.ops)
        self.ops.append(
            LayerOp(
                key=OpKey(layer, path, name, occurrence),
                flops=int(count_flops(*args, **kwargs, out_val=out)) if count_flops else 0,
                output_bytes=0 if func.is_view else sum(t.numel() * t.element_size() for t in outputs),
                output_numel=sum(t.numel() for t in outputs),
                activation_input_numel=sum(t.numel() for t, act in zip(inputs, is_activation) if act),
                structural=structural,
            )
        )
        for tensor in inputs:
            producer = self.producer.get(tensor)
            if producer is not None and index not in self.ops[producer].consumers:
                self.ops[producer].consumers.append(index)
        for tensor in outputs:
            self.producer[tensor] = index
            if any(is_activation):
                self.activations[tensor] = True
        return out


def trace_layer_ops(layers: torch.nn.ModuleList, run_forward: Callable[[], object]) -> tuple[list[LayerOp], list[int]]:
    """Run `run_forward()` (a forward of the model owning `layers`) and record its decoder-layer ops.

    Returns the ops in execution order and, per layer, the bytes of its tensor positional inputs
    (what a checkpointed layer keeps at the least). Run it under `torch.no_grad()` to keep memory at
    inference level: the ops are the same.
    """
    input_bytes: dict[int, int] = {}

    def on_layer_start(index, args):
        recorder.start_layer(index, args)
        input_bytes[index] = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))

    tracker = LayerPathTracker(layers, on_layer_start)
    recorder = _DataFlowRecorder(tracker)
    try:
        with recorder:
            run_forward()
    finally:
        tracker.remove()
    return recorder.ops, [input_bytes.get(index, 0) for index in range(len(layers))]

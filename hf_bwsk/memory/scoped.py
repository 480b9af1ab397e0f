"""Scoped execution of a recompute plan: keep/replay only where the plan keeps ops, no dispatch mode elsewhere.

`SelectivePolicy` (per-op execution) runs each checkpointed layer under torch's selective-checkpoint
dispatch mode, which routes *every* aten op of the layer through Python, in the forward and in the
recompute (~20 us an op on a CPU), and hooks every submodule to name the ops. A plan keeps a few
expensive ops; all the others are recomputed, which is what plain checkpointing does with no machinery
at all. So the layer is checkpointed plainly (as HF's activation checkpointing does) and keep/replay
runs only in the plan's *scopes* (`scopes_of`), one per kept `OpKey`'s module (the innermost module
running the op), a scope nested in another being covered by the outer one. A skipped op
(`RecomputePlan.skip`: its output is read by nothing backward needs; unless the recompute never
reaches it: `RecomputePlan.unreached`) is scoped like a kept one, but
its forward caches only its output's layout, and the recompute hands back a zero tensor of that layout
(`_Unwritten`) instead of running it: neither its bytes are kept nor its FLOPs spent. Three kinds:

* **linear**: an `nn.Linear` whose one planned op, its matmul, is kept: its forward runs natively
  and its output is cached; in the recompute `_RecomputedLinear` hands the output back and saves for
  backward exactly the views of input and weight that `F.linear` saved in the forward (probed once
  per kind of call, `_linear_layout`), so the forward's own autograd graph and backward are used
  (gradients equal per-op's bit for bit). No dispatch mode, no hook. Where `F.linear` saves anything
  else (under autocast, which casts inside it) the call runs in the dispatch mode, as a module scope.
* **attention**: a module whose own planned ops are attention kernels only, and which calls a
  transformers attention function from `ALL_ATTENTION_FUNCTIONS` (sdpa, flash, flex): only that call
  runs in the mode (the registry entry is wrapped, reference counted, restored on `remove()`; other
  modules pass through with one dict lookup). Its other ops (views, rotary) are recomputed anyway,
  and its attention kernels run nowhere else, so their occurrences are the planner's. Narrower still
  for `sdpa`: only its `F.scaled_dot_product_attention` call runs in the mode, and its recompute in
  none (`kernel_call.KernelCall`).
* **module**: any other scope. Its pre-hook enters `_Record` (a small `TorchDispatchMode`), which
  decides each op by its `OpKey` as the per-op policy does and caches a kept op's output, detached
  with its version counter as torch's `_CachingTorchDispatchMode` does; in the recompute `_Replay`
  hands the cached outputs back (by op overload and call count within the layer call's scopes, as
  torch's `_CachedTorchDispatchMode`) and runs every other op. Both sit below autograd, so the
  recompute saves what the forward saved. Path hooks sit only on modules inside module scopes:
  every op at a path inside a scope runs while the scope runs, so occurrences per (path, op) within
  a layer call are the planner's.

`context_fn` (`layer_contexts`) returns two plain context managers that open a fresh cache per
layer call and mark forward or recompute; one pre-hook per layer records the layer's index. Plan
fidelity counts hits (planned ops seen in scopes: all kept ops, and the recomputed ones inside
scopes) and misses (an expensive op in a scope that the plan lacks, or a kept op the forward of a
layer call did not run); the first of each warns once. A plan cannot be scoped when it keeps an op run
by the layer module itself; `ReversibleMode` then runs it per-op, and always under `torch.compile`.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from typing import Any, NamedTuple

import torch
from .._compat import (
    IGNORED_BY_CHECKPOINT,
    CachedTensor,
    TorchDispatchMode,
    attention_implementation,
    detach_for_cache,
    local_attention_function,
    outside_dispatch_modes,
    tensor_version,
    tree_map,
)
from ..analysis import op_names
from .kernel_call import KernelCall
from .plan import OpKey, RecomputePlan
from .policy import SKIP, PlanDecisions, pop_path, push_path

_ATTENTION_OPS = frozenset(op_names.ATTENTIONS.split())


class Scopes(NamedTuple):
    """Where a layer's plan runs: module paths (keep/replay over the module's forward), attention paths
    (keep/replay over the call of transformers' attention function that the module makes) and linear
    paths (an `nn.Linear` whose one planned op, its matmul, is kept: `_RecomputedLinear`, no dispatch mode)."""

    modules: dict[int, list[str]]
    attention: dict[int, list[str]]
    linears: dict[int, list[str]] = {}


def _is_attention(op: str) -> bool:
    return op.split(".")[1] in _ATTENTION_OPS if op.startswith("aten.") else False


def _attention_function(module: torch.nn.Module) -> str | None:
    """The registered transformers attention implementation ``module`` calls (None: eager or unknown)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = attention_implementation(getattr(module, "config", None))
    return name if name is not None and name != "eager" and name in ALL_ATTENTION_FUNCTIONS else None


def scopes_of(plan: RecomputePlan, layers: torch.nn.ModuleList) -> Scopes | None:
    """Per layer index, where its kept ops run (`Scopes`); None when the plan cannot be scoped.

    A kept op's scope is the module at its path, scopes nested in another being covered by the
    outer one. A module whose own planned ops (at exactly its path) are all attention kernels, and
    which calls a registered transformers attention function, is scoped to that call only: its other
    ops are views and rotary arithmetic, recomputed anyway, and its attention kernels run nowhere
    else, so their occurrences are the planner's. A plan cannot be scoped when it keeps an op run by
    a layer module itself (path ''), or one whose path names no submodule of its layer.
    """
    paths: dict[int, set[str]] = {}
    for key in plan.keep | plan.skip - plan.unreached:  # the recompute stops before an unreached op
        if key.path == "" or not 0 <= key.layer < len(layers):
            return None
        try:
            layers[key.layer].get_submodule(key.path)
        except AttributeError:
            return None
        paths.setdefault(key.layer, set()).add(key.path)
    own_ops: dict[tuple[int, str], set[str]] = {}
    for key in plan.keep | plan.recompute | plan.skip:
        own_ops.setdefault((key.layer, key.path), set()).add(key.op)
    modules, attention, linears = {}, {}, {}
    for layer, found in sorted(paths.items()):
        calls = {path for path in found if all(map(_is_attention, own_ops[layer, path]))
                 and _attention_function(layers[layer].get_submodule(path)) is not None}
        plain = {path for path in found - calls if type(layers[layer].get_submodule(path)) is torch.nn.Linear
                 and {(key.op, key.occurrence) for key in plan.keep | plan.recompute | plan.skip
                      if key.layer == layer and key.path == path} <= _LINEAR_KEYS}
        outer = found - calls - plain
        covered = functools.partial(_covered, outer)
        modules[layer] = [path for path in sorted(outer) if not covered(path)]
        attention[layer] = [path for path in sorted(calls) if not covered(path)]
        linears[layer] = [path for path in sorted(plain) if not covered(path)]
    return Scopes(modules, attention, linears)


# The planned keys of an `nn.Linear` that runs as a linear scope: its one matmul, with or without bias.
_LINEAR_KEYS = {("aten.addmm.default", 0), ("aten.mm.default", 0)}


def _covered(outer: set[str], path: str) -> bool:
    return any(path.startswith(scope + ".") for scope in outer)


def _linear_layout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, ...] | None:
    """What `F.linear` saves for backward on tensors like these, in order, as views of its input and weight.

    ``"x"`` (the input), ``"x2d"`` (the input flattened to 2-D), ``"w"`` (the weight), ``"wt"`` (its
    transpose); None when it saves anything else (autocast's casts, a layout we do not know) or the input
    is not contiguous. Probed on tiny tensors (a 3 x 2 weight) of the same dtypes, device, dimensions and
    requires-grad flags, outside every dispatch mode.
    """
    if not x.is_contiguous():
        return None
    probe = functools.partial(torch.zeros, device=x.device)
    probe_x = probe((2,) * x.dim(), dtype=x.dtype).requires_grad_(x.requires_grad)
    probe_w = probe((3, 2), dtype=weight.dtype).requires_grad_(weight.requires_grad)
    probe_b = None if bias is None else probe(3, dtype=bias.dtype).requires_grad_(bias.requires_grad)
    saved = []
    with (outside_dispatch_modes(), torch.enable_grad(),
          torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)):
        torch.nn.functional.linear(probe_x, probe_w, probe_b)
    views = {"x": probe_x, "x2d": probe_x.reshape(-1, 2), "w": probe_w, "wt": probe_w.t()}
    layout = []
    for tensor in saved:
        # By storage, shape, strides and offset (a square weight and its transpose share the shape).
        found = [name for name, view in views.items()
                 if view.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
                 and (view.shape, view.stride(), view.storage_offset())
                 == (tensor.shape, tensor.stride(), tensor.storage_offset())]
        if not found:
            return None
        layout.append(found[0])
    return tuple(layout)


class _RecomputedLinear(torch.autograd.Function):
    """A kept linear in the recompute: its cached output, saving what `F.linear` saved in the forward.

    The forward ran `F.linear` itself (native autograd, native backward); the recompute only has to
    hand the checkpoint the same saved tensors in the same order (`_linear_layout`), which backward
    then unpacks into the forward's graph. This graph is discarded, never differentiated. Input and
    weight are its inputs, whichever of them is saved: the output requires grad as `F.linear`'s did, so
    the ops after it save in the recompute what they saved in the forward.
    """

    @staticmethod
    def forward(ctx, x, weight, cached, layout):
        views = {"x": lambda: x, "x2d": lambda: x.reshape(-1, x.shape[-1]), "w": lambda: weight, "wt": weight.t}
        ctx.save_for_backward(*(views[entry]() for entry in layout))
        return cached.detach()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("bwsk: a checkpoint's recompute graph is never differentiated")


# Attention modules whose calls of the attention function run in a scope: module -> ScopedExecution.
_ATTENTION_SCOPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Attention implementations wrapped in transformers' registry: name -> [previous local entry, users].
_WRAPPED: dict[str, list] = {}


def _wrap_attention_function(name: str) -> None:
    """Route the registered attention function ``name`` through `_ATTENTION_SCOPES` (reference counted).

    A module not in a scope calls the original with one dict lookup more; `_unwrap_attention_function`
    restores the registry once its last user is gone.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in _WRAPPED:
        _WRAPPED[name][1] += 1
        return
    original = ALL_ATTENTION_FUNCTIONS[name]

    @functools.wraps(original)
    def attention(module, *args, **kwargs):
        execution = _ATTENTION_SCOPES.get(module)
        if execution is None:
            return original(module, *args, **kwargs)
        return execution._attention_call(original, module, args, kwargs)

    _WRAPPED[name] = [local_attention_function(name), 1]
    ALL_ATTENTION_FUNCTIONS[name] = attention


# Attention implementations whose kernel `KernelCall` finds in the call (others run wholly in the mode).
_KERNEL_CALL_IMPLEMENTATIONS = frozenset({"sdpa"})


def _unwrap_attention_function(name: str) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    entry = _WRAPPED[name]
    entry[1] -= 1
    if entry[1]:
        return
    del _WRAPPED[name]
    if entry[0] is None:
        del ALL_ATTENTION_FUNCTIONS[name]
    else:
        ALL_ATTENTION_FUNCTIONS[name] = entry[0]


class _LayerCall:
    """One checkpointed layer call: the kept outputs, shared by its forward and its recompute."""

    __slots__ = ("storage", "recompute", "modes", "counts", "kept_seen", "layer")

    def __init__(self):
        self.storage: dict = {}
        self.recompute = False
        self.modes: list[TorchDispatchMode] = []
        self.counts: dict = {}
        self.kept_seen = 0
        self.layer: int | None = None


class _Record(TorchDispatchMode):
    """Forward inside a scope: decide each op by its `OpKey`, cache the outputs the plan keeps."""

    def __init__(self, execution: ScopedExecution, call: _LayerCall):
        super().__init__()
        self.execution, self.call = execution, call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in IGNORED_BY_CHECKPOINT:
            decision = self.execution._keep(self.call, func)
            if decision:
                keep = _Unwritten if decision is SKIP else lambda x: CachedTensor(detach_for_cache(x))
                self.call.storage[func, self.call.counts.get(func, 1) - 1] = tree_map(keep, out)
        return out


class _Replay(TorchDispatchMode):
    """Recompute inside a scope: hand back the cached outputs, run every other op."""

    def __init__(self, call: _LayerCall):
        super().__init__()
        self.call = call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in IGNORED_BY_CHECKPOINT:
            counts = self.call.counts
            index = counts.get(func, 0)
            counts[func] = index + 1
            entry = self.call.storage.pop((func, index), None)
            if entry is not None:
                return tree_map(lambda x: x.get_val(False), entry)
        return func(*args, **(kwargs or {}))


class _Unwritten:
    """A skipped op's output in the recompute: a zero tensor of the forward output's layout, not computed.

    Nothing backward needs reads it (`plan.unread_outputs`); zeros rather than uninitialised memory,
    so that whatever inspects the recompute's discarded values (a forward hook) sees no garbage.
    """

    __slots__ = ("size", "stride", "dtype", "device")

    def __init__(self, tensor: torch.Tensor):
        self.size, self.stride = tensor.size(), tensor.stride()
        self.dtype, self.device = tensor.dtype, tensor.device

    def get_val(self, allow_cache_entry_mutation: bool) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=self.device).zero_()


class _Context:
    """The plain context manager `context_fn` returns for a layer call's forward or its recompute."""

    __slots__ = ("execution", "call", "recompute")

    def __init__(self, execution: ScopedExecution, call: _LayerCall, recompute: bool):
        self.execution, self.call, self.recompute = execution, call, recompute

    def __enter__(self):
        self.call.recompute = self.recompute
        self.call.counts = {}
        self.execution._calls.append(self.call)

    def __exit__(self, *exc_info):
        execution, call = self.execution, self.call
        while call.modes:  # left by an exception (early-stopped recompute) before the scope's hook ran
            call.modes.pop().__exit__(None, None, None)
        execution._calls.pop()
        if not self.recompute and exc_info[0] is None:
            execution._check_kept(call)
        return False


class ScopedExecution(PlanDecisions):
    """Scoped execution of a plan: its `context_fn` applies ``plan`` inside its scopes only (module docstring).

    Same surface as `SelectivePolicy`: ``plan`` (settable to a plan with the same scopes), the live
    ``fidelity`` dict and the optional ``decisions`` dict of forward decisions by key (ops in scopes).
    ``scopes``: `scopes_of(plan, layers)`. `remove()` takes the hooks away.
    """

    execution = "scoped"

    def __init__(self, plan: RecomputePlan, layers: torch.nn.ModuleList, scopes: Scopes):
        self.scopes = scopes
        super().__init__(plan)
        self._calls: list[_LayerCall] = []
        self._stack: list[str] = []
        self._layer: int | None = None
        self._handles = []
        self._attention: dict[torch.nn.Module, tuple[str, bool]] = {}  # module -> (path, runs as a `KernelCall`)
        self._linears: dict[torch.nn.Module, Any] = {}  # module -> its own forward before ours (None: the class')
        self._linear_layouts: dict[tuple, tuple[str, ...] | None] = {}  # by kind of call (`_linear_layout`)
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index)))
            for path in scopes.linears.get(index, ()):
                module = layer.get_submodule(path)
                (op,) = {key.op for key in plan.keep | plan.skip if key.layer == index and key.path == path}
                self._linears[module] = module.__dict__.get("forward")
                module.forward = self._linear_forward(module, path, op, module.forward)
            for path in scopes.attention.get(index, ()):
                module = layer.get_submodule(path)
                implementation = _attention_function(module)
                self._attention[module] = (path, implementation in _KERNEL_CALL_IMPLEMENTATIONS)
                _wrap_attention_function(implementation)
                _ATTENTION_SCOPES[module] = self
            for scope in scopes.modules.get(index, ()):
                module = layer.get_submodule(scope)
                self._handles.append(module.register_forward_pre_hook(self._enter_scope(scope)))
                self._handles.append(module.register_forward_hook(self._leave_scope, always_call=True))
                for name, inner in module.named_modules():
                    if name:
                        self._handles.append(inner.register_forward_pre_hook(push_path(self._stack, f"{scope}.{name}")))
                        self._handles.append(inner.register_forward_hook(pop_path(self._stack), always_call=True))

    @PlanDecisions.plan.setter
    def plan(self, plan: RecomputePlan) -> None:
        PlanDecisions.plan.fset(self, plan)
        # The kept and skipped ops this execution sees run (an unreached op outside the scopes it does not).
        self._kept_per_layer = Counter(key.layer for key in plan.keep | plan.skip if self.visible(key))

    def visible(self, key: OpKey) -> bool:
        """Whether ``key``'s op runs inside a scope, where this execution sees (and counts) it."""
        if key.path in self.scopes.attention.get(key.layer, ()) and _is_attention(key.op):
            return True
        if key.path in self.scopes.linears.get(key.layer, ()):
            return True
        return any(key.path == scope or key.path.startswith(scope + ".") for scope in self.scopes.modules.get(key.layer, ()))

    def layer_contexts(self) -> tuple:
        call = _LayerCall()
        return _Context(self, call, False), _Context(self, call, True)

    # --- hooks ---------------------------------------------------------------------------------

    def _layer_hook(self, index):
        def hook(module, args):
            self._layer = index

        return hook

    def _enter_scope(self, scope):
        def hook(module, args):
            self._stack.append(scope)
            if self._calls and len(self._stack) == 1:
                self._open(self._calls[-1])

        return hook

    def _leave_scope(self, module, args, output):
        if self._stack:
            self._stack.pop()
        if self._calls and not self._stack:
            self._close(self._calls[-1])

    def _set_layer(self, call: _LayerCall) -> None:
        if call.layer is None:
            call.layer = self._layer
            if self._layer is None:
                self._warn_once("layer", "bwsk reversible mode: a checkpointed op ran with no layer index "
                                "(the decoder-layer hooks did not run), so every op misses the recompute plan")

    def _open(self, call: _LayerCall) -> None:
        """Enter the layer call's keep (forward) or replay (recompute) mode."""
        self._set_layer(call)
        mode = _Replay(call) if call.recompute else _Record(self, call)
        mode.__enter__()
        call.modes.append(mode)

    def _close(self, call: _LayerCall) -> None:
        if call.modes:
            call.modes.pop().__exit__(None, None, None)

    def _linear_forward(self, module: torch.nn.Linear, path: str, op: str, original):
        """The forward of a kept `nn.Linear` in a layer call: native, its output cached; replayed in the recompute.

        When `F.linear` would save anything but views of the input and weight (under autocast, which
        casts inside it), the call runs in the dispatch mode instead, as a module scope would; forward
        and recompute run under the same autocast, so they agree.
        """
        layouts = self._linear_layouts

        def forward(x):
            if not self._calls or self._stack:  # not checkpointed now, or inside a scope's mode already
                return original(x)
            call = self._calls[-1]
            weight, bias = module.weight, module.bias
            signature = (x.dim(), x.is_contiguous(), x.requires_grad, weight.requires_grad, bias is None,
                         bias is not None and bias.requires_grad, x.dtype, weight.dtype, x.device,
                         torch.is_autocast_enabled(x.device.type))
            layout = layouts.get(signature, False)
            if layout is False:
                layout = layouts[signature] = None if signature[-1] else _linear_layout(x, weight, bias)
            if layout is None:
                self._stack.append(path)
                self._open(call)
                try:
                    return original(x)
                finally:
                    self._close(call)
                    self._stack.pop()
            self._set_layer(call)
            occurrence = call.counts.get(module, 0)
            call.counts[module] = occurrence + 1
            if call.recompute:
                entry = call.storage.pop((module, occurrence), None)
                if entry is not None and entry[1] is None:  # skipped: nothing backward needs reads its value
                    return _RecomputedLinear.apply(x, weight, entry[0].get_val(False), layout)
                if entry is not None and tensor_version(entry[0]) == entry[1]:
                    return _RecomputedLinear.apply(x, weight, entry[0], layout)
                return original(x)  # not kept, or its output was modified in place since
            out = original(x)
            decision = self._decide(call, path, op, occurrence, True)
            if decision is SKIP:
                call.storage[module, occurrence] = (_Unwritten(out), None)
            elif decision:
                cached = out.detach()
                call.storage[module, occurrence] = (cached, tensor_version(cached))
            return out

        return forward

    def _attention_call(self, original, module, args, kwargs):
        """A scoped attention module's call of the attention function: in its layer call's mode."""
        if not self._calls or self._stack:  # not checkpointed now, or already inside a scope
            return original(module, *args, **kwargs)
        call = self._calls[-1]
        path, kernel_call = self._attention[module]
        self._stack.append(path)
        try:
            if kernel_call:
                with KernelCall(call, self._open, self._close, path):
                    return original(module, *args, **kwargs)
            self._open(call)
            try:
                return original(module, *args, **kwargs)
            finally:
                self._close(call)
        finally:
            self._stack.pop()

    # --- decisions -----------------------------------------------------------------------------

    def _keep(self, call: _LayerCall, func) -> bool | str:
        """The forward decision for one op in a scope (True, False or `SKIP`); counts its occurrence and the plan fidelity."""
        name, expensive = self._ops[func]
        counts = call.counts
        counts[func] = counts.get(func, 0) + 1
        path = self._stack[-1]
        group = (path, name)
        occurrence = counts.get(group, 0)
        counts[group] = occurrence + 1
        return self._decide(call, path, name, occurrence, expensive)

    def _decide(self, call: _LayerCall, path: str, name: str, occurrence: int, expensive: bool) -> bool | str:
        keep = self._planned.get((call.layer, path, name, occurrence))
        if keep is None:
            key = OpKey(call.layer, path, name, occurrence)
            keep = self._plan.keeps(key, expensive)
            self._count_unplanned(key, expensive, keep)
        else:
            self.fidelity["plan_hits"] += 1
            call.kept_seen += bool(keep)
        if self.decisions is not None:
            self.decisions[OpKey(call.layer, path, name, occurrence)] = keep
        return keep

    def _check_kept(self, call: _LayerCall) -> None:
        """After a layer call's forward: a kept op of the plan that did not run there is a miss."""
        layer = call.layer if call.layer is not None else self._layer
        expected = self._kept_per_layer.get(layer, 0)
        for _ in range(expected - call.kept_seen):
            self._count_miss(f"{layer}:<kept op not run>", "not run",
                             f"bwsk reversible mode: a kept op of layer {layer}'s recompute plan did not run in its "
                             "forward (the layer took another path than the first batch's trace); counts in the "
                             "status' plan_fidelity")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in self._linears.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._linears.clear()
        for module in self._attention:
            if _ATTENTION_SCOPES.get(module) is self:
                del _ATTENTION_SCOPES[module]
            _unwrap_attention_function(_attention_function(module))
        self._attention.clear()

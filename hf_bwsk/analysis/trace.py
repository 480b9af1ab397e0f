"""Tracing a forward pass at the aten level: every op, its module, its data flow and its class.

A `TorchDispatchMode` sees each aten op after autograd and composite decompositions; forward
pre/post hooks on every module keep a stack of the modules running, so each op is tagged with the
innermost one. Tensors derived from the input ids are marked as activations (an attribute on the
tensor, propagated from inputs to outputs), which tells data-path ops from auxiliary ones and lets
the rules tell ``x * W`` from ``x * gate(x)``. Each record also names the records whose outputs
it reads (its producers), so plans can follow the data flow from op to op.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from .._compat import TorchDispatchMode, flop_formula_of, op_packet, op_schema, shape_formula, view_base
from ..errors import BWSKError
from .attention_flops import ATTENTION_FLOP_FORMULAS
from .axes import AxisSizes
from .meta_shortcuts import MetaPointwise, matmul_applies, run_matmul
from .mixing import NONE, mixed_axes
from .records import OpRecord
from .rules import (
    DROPPING_SLICE,
    FACTORY_OPS,
    PARTITION,
    RANDOM_OPS,
    OpCall,
    SlicePiece,
    classify,
)

# Origin marks carried by traced tensors.
_ORIGIN = "_bwsk_origin"
ACTIVATION, RANDOM = 1, 2

_aten = torch.ops.aten
_ITEM = _aten._local_scalar_dense.default


def flop_formula(func):
    """The FLOP formula of an aten overload, as torch.utils.flop_counter's registry holds them (called with
    the op's arguments and ``out_val``), or None for ops counted as free. Attention ops get ours
    (`attention_flops`), every other op torch's."""
    packet = op_packet(func)
    ours = ATTENTION_FLOP_FORMULAS.get(packet)
    return shape_formula(ours) if ours is not None else flop_formula_of(packet)


def _origin(value) -> int:
    return getattr(value, _ORIGIN, 0) if isinstance(value, torch.Tensor) else 0


def is_activation(value) -> bool:
    return _origin(value) == ACTIVATION


def is_random(value) -> bool:
    return _origin(value) == RANDOM


def mark_activation(tensor: torch.Tensor) -> None:
    setattr(tensor, _ORIGIN, ACTIVATION)


def _tensors(values) -> list[torch.Tensor]:
    """Tensors among call arguments or outputs (one level of lists, as aten signatures have)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, torch.Tensor))
    return found


@dataclass(frozen=True)
class _OpInfo:
    """What the tracer needs to know about an aten overload, computed once per overload."""

    op: str
    name: str
    aliased_outputs: tuple[bool, ...]
    mutates_first: bool
    factory: bool
    random: bool
    pointwise: bool
    relabels: bool
    flops: object

    @classmethod
    def of(cls, func) -> _OpInfo:
        schema = op_schema(func)
        packet = op_packet(func)
        name = packet.__name__
        first = schema.arguments[0] if schema.arguments else None
        # _unsafe_view is a view whose schema hides the alias (for autograd's sake).
        aliased_outputs = tuple(ret.alias_info is not None or name == "_unsafe_view" for ret in schema.returns)
        mutates_first = bool(first is not None and first.alias_info is not None and first.alias_info.is_write)
        return cls(
            op=str(func),
            name=name,
            aliased_outputs=aliased_outputs,
            mutates_first=mutates_first,
            factory=name in FACTORY_OPS or name in RANDOM_OPS,
            random=name in RANDOM_OPS,
            pointwise=torch.Tag.pointwise in func.tags,
            relabels=(any(aliased_outputs) and not mutates_first) or name == "_to_copy",
            flops=flop_formula(func),
        )


class ModuleStack:
    """Forward pre/post hooks on every module, keeping the innermost running module on top."""

    def __init__(self, model: torch.nn.Module, layers_path: str | None):
        root = ("", type(model).__name__, None, None)
        self.stack = [root]
        self._handles = []
        prefix = layers_path + "." if layers_path else None
        for path, module in model.named_modules():
            entry = (path, type(module).__name__, *self._layer_of(path, prefix))
            self._handles.append(module.register_forward_pre_hook(self._push(entry)))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))

    @staticmethod
    def _layer_of(path: str, prefix: str | None) -> tuple[int | None, str | None]:
        if prefix is None or not path.startswith(prefix):
            return None, None
        index, _, rest = path[len(prefix):].partition(".")
        return (int(index), rest) if index.isdigit() else (None, None)

    def _push(self, entry):
        def push(module, args):
            self.stack.append(entry)

        return push

    def _pop(self, module, args, output):
        self.stack.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class OpTracer(TorchDispatchMode):
    """Records an `OpRecord` for every aten op run while active (identities are only counted)."""

    def __init__(self, modules: ModuleStack, axes: AxisSizes | None):
        super().__init__()
        self.records: list[OpRecord] = []
        self.skipped: Counter[str] = Counter()
        self._modules = modules
        self._axes = axes
        self._infos: dict = {}
        # Slices of one source along one dim, keyed by id(source): (weakref to source, pieces).
        self._slice_groups: dict[tuple[int, int], tuple[weakref.ref, list]] = {}
        self._closed_groups: list[list] = []
        self._meta_pointwise = MetaPointwise()
        # Tensors written in place get marked, and may outlive the trace (buffers): unmarked at the end.
        self.marked_in_place: list[weakref.ref] = []
        # id(tensor) -> (weak reference to it, indices of the records that produced it; several when
        # an identity merged them). The reference tells a live tensor from a dead one whose id was
        # reused; a plain dict with weakref.ref costs a fraction of a WeakIdKeyDictionary per lookup.
        self._producers: dict[int, tuple[weakref.ref, tuple[int, ...]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # The hot path of the trace (tens of thousands of calls for a reference scan): keep it lean.
        kwargs = kwargs or {}
        info = self._infos.get(func)
        if info is None:
            info = self._infos[func] = _OpInfo.of(func)
        out = self._run(func, info, args, kwargs)
        inputs = _tensors(args)
        if kwargs:
            inputs += _tensors(kwargs.values())
        origins = {getattr(tensor, _ORIGIN, 0) for tensor in inputs}
        data_path = ACTIVATION in origins and not info.factory
        outputs = _tensors(out) if isinstance(out, (tuple, list)) else [out] if isinstance(out, torch.Tensor) else []
        self._propagate(info, args, outputs, _output_origin(info, origins))
        call = OpCall(info.name, args, kwargs, out, is_activation, is_random)
        verdict = classify(call)
        producers = self._producers_of(inputs)
        if verdict is None:
            self.skipped[info.op] += 1
            # An identity hands its input on unchanged: its output comes from its input's producers.
            self._set_producers(outputs, producers)
            return out
        piece = None
        if isinstance(verdict, SlicePiece):
            piece, verdict = verdict, DROPPING_SLICE
        module_path, module_class, layer, path_in_layer = self._modules.stack[-1]
        index = len(self.records)
        self.records.append(OpRecord(
            index, info.op, module_path, module_class, layer,
            tuple(tuple(tensor.shape) for tensor in inputs),
            tuple(tuple(tensor.shape) for tensor in outputs),
            _new_bytes(info, outputs),
            _flops(info.flops, args, kwargs, out) if info.flops is not None else 0,
            verdict.kind, verdict.reason, data_path,
            mixed_axes(call, self._axes) if data_path and self._axes is not None else NONE,
            path_in_layer,
            producers,
            sum(tensor.numel() for tensor in inputs if getattr(tensor, _ORIGIN, 0) == ACTIVATION),
            info.relabels,
        ))
        self._set_producers(outputs, (index,))
        if piece is not None:
            self._add_piece(index, piece)
        return out

    def _producers_of(self, inputs: list[torch.Tensor]) -> tuple[int, ...]:
        found = set()
        for tensor in inputs:
            entry = self._producers.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                found.update(entry[1])
        return tuple(sorted(found))

    def _set_producers(self, outputs: list[torch.Tensor], producers: tuple[int, ...]) -> None:
        for tensor in outputs:
            self._producers[id(tensor)] = (weakref.ref(tensor), producers)

    def _run(self, func, info: _OpInfo, args, kwargs):
        if info.pointwise and self._meta_pointwise.applies(args, kwargs):
            return self._meta_pointwise.run(func, args, kwargs, info.mutates_first)
        if matmul_applies(func, args):
            return run_matmul(args)
        if func is _ITEM and args[0].is_meta:
            # Meta tensors have no values. Data-dependent checks in the HF code ask whether the
            # attention mask is all ones, or the sequences unpacked: answer as an ordinary batch.
            if args[0].dtype == torch.bool:
                return True
            raise BWSKError(
                "the forward reads a tensor value (.item()) that meta tensors do not have; "
                "analyze the model with real weights instead of its config"
            )
        return func(*args, **kwargs)

    def _propagate(self, info: _OpInfo, args, outputs: list[torch.Tensor], origin: int) -> None:
        if not origin:
            return
        targets = list(outputs)
        if info.mutates_first and isinstance(args[0], torch.Tensor):
            # An in-place write marks the written tensor and the base it views into.
            base = view_base(args[0])
            written = [args[0]] if base is None else [args[0], base]
            targets += written
            self.marked_in_place += [weakref.ref(tensor) for tensor in written]
        for tensor in targets:
            if getattr(tensor, _ORIGIN, 0) != ACTIVATION:
                setattr(tensor, _ORIGIN, origin)

    def _add_piece(self, index: int, piece: SlicePiece) -> None:
        key = (id(piece.source), piece.dim)
        group = self._slice_groups.get(key)
        if group is None or group[0]() is not piece.source:
            if group is not None:
                self._closed_groups.append(group[1])
            group = self._slice_groups[key] = (weakref.ref(piece.source), [])
        # Only the interval is kept: holding the source would keep real activations alive.
        group[1].append((index, piece.start, piece.stop, piece.size))

    def finish(self) -> list[OpRecord]:
        """Upgrade slices that partition their source to S; return the records."""
        for pieces in self._closed_groups + [group[1] for group in self._slice_groups.values()]:
            if _covers(pieces):
                for index, *_ in pieces:
                    self.records[index].kind = PARTITION.kind
                    self.records[index].reason = PARTITION.reason
        return self.records


def trace_call(
    fn: Callable,
    *activations: torch.Tensor,
    model: torch.nn.Module | None = None,
    layers_path: str | None = None,
    axes: AxisSizes | None = None,
) -> tuple[list[OpRecord], dict[str, int]]:
    """Run ``fn(*activations)`` under the tracer, without gradients; return the records and the
    counts of skipped identities. ``activations`` are marked as the data path; ops are tagged with
    the modules of ``model`` (and layer indices under ``layers_path``)."""
    for tensor in activations:
        mark_activation(tensor)
    modules = ModuleStack(model if model is not None else torch.nn.Module(), layers_path)
    tracer = OpTracer(modules, axes)
    # Tens of thousands of records would trigger repeated full garbage collections (a fifth of
    # the trace time); nothing the trace allocates needs the cycle collector before it ends.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad(), tracer:
            fn(*activations)
    finally:
        modules.remove()
        if collecting:
            gc.enable()
        # Leave no mark on tensors the caller keeps (inputs, buffers written in place).
        for tensor in (*activations, *(ref() for ref in tracer.marked_in_place)):
            if tensor is not None:
                tensor.__dict__.pop(_ORIGIN, None)
    return tracer.finish(), dict(tracer.skipped)


def _new_bytes(info: _OpInfo, outputs: list[torch.Tensor]) -> int:
    """Bytes of newly allocated outputs; views and in-place results allocate nothing."""
    if len(info.aliased_outputs) != len(outputs):
        # One declared return holding several tensors (split, unbind): all views or all new.
        return 0 if any(info.aliased_outputs) else sum(t.numel() * t.element_size() for t in outputs)
    return sum(t.numel() * t.element_size() for t, aliased in zip(outputs, info.aliased_outputs) if not aliased)


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (list, tuple)):
        return type(value)(_shape_of(item) for item in value)
    return value


def _flops(formula, args, kwargs, out) -> int:
    """torch.utils.flop_counter's formula, given shapes directly (its own wrapper walks pytrees)."""
    raw = getattr(formula, "__wrapped__", None)
    if raw is None:
        return int(formula(*args, **kwargs, out_val=out))
    shapes = [_shape_of(value) for value in args]
    return int(raw(*shapes, out_shape=_shape_of(out), **{key: _shape_of(value) for key, value in kwargs.items()}))


def _output_origin(info: _OpInfo, origins: set[int]) -> int:
    """Factories make fresh tensors (random ones for dropout masks); other ops pass marks on."""
    if info.factory:
        return RANDOM if info.random else 0
    if ACTIVATION in origins:
        return ACTIVATION
    return RANDOM if RANDOM in origins else 0


def _covers(pieces: list) -> bool:
    size = pieces[0][3]
    reached = 0
    for start, stop in sorted((start, stop) for _, start, stop, _ in pieces):
        if start > reached:
            return False
        reached = max(reached, stop)
    return reached >= size

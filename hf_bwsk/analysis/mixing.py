"""Which axes an op mixes: the dims along which one output element depends on input elements at
other positions (reductions, contractions, normalisation, softmax, convolution, attention).

Position-moving ops (select, slice, cat, stack) count along the sequence axis only: there they shift
or step through positions (a scan reads one step at a time), which under context parallelism moves
data between shards. Along features, such relayouts (splitting q/k/v, rotary halves) stay local in
the usual tensor-parallel layouts, and nothing moves rows between batch entries.

`AxisSizes.axes_of(size)` tells which axes a dim of that size carries (see `axes.py`).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import op_names
from .axes import SEQUENCE, AxisSizes
from .rules import OpCall

Mixing = Callable[[OpCall, AxisSizes], frozenset]
MIXING: dict[str, Mixing] = {}
NONE = frozenset()


def _register(names: str):
    def register(function: Mixing) -> Mixing:
        for name in names.split():
            MIXING[name] = function
        return function

    return register


def mixed_axes(call: OpCall, axes: AxisSizes) -> frozenset:
    """The axes among batch / sequence / hidden that this call mixes (empty for element-wise ops)."""
    found = MIXING.get(call.name)
    return found(call, axes) if found is not None else NONE


def _dims(source: torch.Tensor, dims) -> list[int]:
    """Normalised reduction dims; None or [] mean all of them."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(source.dim()))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return [dim % max(source.dim(), 1) for dim in dims]


def _axes_of_dims(source: torch.Tensor, dims, axes: AxisSizes) -> frozenset:
    found = set()
    for dim in _dims(source, dims):
        if source.dim():
            found |= axes.axes_of(source.shape[dim])
    return frozenset(found)


# Where the dim argument sits, and its default, for reductions that do not take it second or that
# default to the last dim rather than to all of them.
_DIM_ARGUMENT = {"topk": (2, -1), "kthvalue": (2, -1), "sort": (1, -1), "cumsum": (1, -1),
                 "norm": (2, None), "linalg_vector_norm": (2, None)}


@_register(op_names.REDUCTIONS + " cumsum sort")
def _reduction(call, axes):
    position, default = _DIM_ARGUMENT.get(call.name, (1, None))
    dims = call.arg(position, "dim", default)
    if isinstance(dims, torch.Tensor):
        return NONE  # max.other / min.other: element-wise
    return _axes_of_dims(call.args[0], dims, axes)


@_register(op_names.SOFTMAXES)
def _softmax(call, axes):
    return _axes_of_dims(call.args[0], call.args[1], axes)


@_register(op_names.LAYER_NORMS)
def _norm(call, axes):
    source = call.args[0]
    count = len(call.args[1])
    return _axes_of_dims(source, list(range(source.dim() - count, source.dim())), axes)


def _contraction(call, axes, left, right):
    """Contracted dim; and, for a product of two activations, any axis carried by the free dims of
    both (q @ k^T pairs every query position with every key position)."""
    found = set(axes.axes_of(left.shape[-1]))
    if call.is_activation(left) and call.is_activation(right) and left.dim() >= 2 and right.dim() >= 2:
        found |= axes.axes_of(left.shape[-2]) & axes.axes_of(right.shape[-1])
    return frozenset(found)


_register(op_names.MATMULS)(lambda call, axes: _contraction(call, axes, call.args[0], call.args[1]))
_register(op_names.BIAS_MATMULS)(lambda call, axes: _contraction(call, axes, call.args[1], call.args[2]))


@_register(op_names.ATTENTIONS)
def _attention(call, axes):
    query, key = call.args[0], call.args[1]
    return axes.axes_of(query.shape[-1]) | axes.axes_of(key.shape[-2])


@_register(op_names.CONVOLUTIONS)
def _convolution(call, axes):
    source, weight = call.args[0], call.args[1]
    found = set()
    for position, kernel in enumerate(weight.shape[2:], start=2):
        if kernel > 1:
            found |= axes.axes_of(source.shape[position])
    if weight.shape[1] > 1:  # each output channel reads several input channels
        found |= axes.axes_of(source.shape[1])
    return frozenset(found)


@_register(op_names.NLL_LOSSES)
def _nll_loss(call, axes):
    scores = call.args[0]
    found = set(axes.axes_of(scores.shape[-1])) if scores.dim() else set()
    if call.args[3] != 0 and scores.dim() > 1:  # reduction mean/sum over the token rows
        found |= axes.axes_of(scores.shape[0])
    return frozenset(found)


@_register(op_names.ELEMENTWISE_LOSSES)
def _loss(call, axes):
    return _axes_of_dims(call.args[0], None, axes)


def _along_sequence(size: int, axes: AxisSizes) -> frozenset:
    return frozenset({SEQUENCE}) if SEQUENCE in axes.axes_of(size) else NONE


@_register("select slice")
def _position_read(call, axes):
    source = call.args[0]
    dim = call.arg(1, "dim", 0) % source.dim()
    return _along_sequence(source.shape[dim], axes)


@_register("cat")
def _cat(call, axes):
    out = call.out
    return _along_sequence(out.shape[call.arg(1, "dim", 0) % out.dim()], axes)


@_register("stack")
def _stack(call, axes):
    return _along_sequence(len(call.args[0]), axes)

"""S / K / Gray rules for aten ops, each with a one-line reason (the table is in docs/ANALYSIS.md).

An op is S when its input can be recovered from its output (given the op's parameters), K when it
erases information, Gray when that depends on runtime values (products of two activations, data-
dependent selection). Identities (aliases, copies, same-dtype casts, full slices) are not
operations: their rule returns ``None`` and the tracer skips them.

Rules see the call through `OpCall`, which says which tensors are activations (derived from the
input ids) and which are random masks, so that ``x * W`` (S) differs from ``x * gate(x)`` (Gray)
and from ``x * dropout_mask`` (K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import op_names

S, K, GRAY = "S", "K", "Gray"
KINDS = (S, K, GRAY)


@dataclass(frozen=True)
class Verdict:
    kind: str
    reason: str


@dataclass(frozen=True)
class SlicePiece:
    """A slice/select of ``source`` along ``dim``: K on its own, S once the pieces taken from the
    same source together cover the whole dim (a partition, e.g. rotate_half or a scan's steps)."""

    source: torch.Tensor
    dim: int
    start: int
    stop: int
    size: int


class OpCall:
    """One aten call as the rules see it: name, arguments, outputs and the origin of each tensor."""

    __slots__ = ("name", "args", "kwargs", "out", "is_activation", "is_random")

    def __init__(self, name, args, kwargs, out, is_activation, is_random):
        self.name = name  # overload packet name, e.g. "mm"
        self.args = args
        self.kwargs = kwargs
        self.out = out
        self.is_activation: Callable[[object], bool] = is_activation
        self.is_random: Callable[[object], bool] = is_random

    def arg(self, index: int, name: str, default=None):
        """A schema argument, positional or keyword (dispatch drops trailing defaults)."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)


Rule = Callable[[OpCall], "Verdict | SlicePiece | None"]
RULES: dict[str, Rule] = {}


def _register(names: str, rule: Rule) -> None:
    for name in names.split():
        if name in RULES:
            raise RuntimeError(f"duplicate S/K rule for aten.{name}")
        RULES[name] = rule


def constant(names: str, kind: str, reason: str) -> None:
    """Ops whose kind does not depend on their arguments."""
    verdict = Verdict(kind, reason)
    _register(names, lambda call: verdict)


def rule(names: str):
    """Decorator registering a context-dependent rule for the given overload packet names."""

    def register(function: Rule) -> Rule:
        _register(names, function)
        return function

    return register


def classify(call: OpCall) -> Verdict | SlicePiece | None:
    """The verdict for one call; ``None`` for an identity; Gray "unclassified" when no rule exists."""
    found = RULES.get(call.name)
    if found is None:
        return Verdict(GRAY, f"unclassified: aten.{call.name}")
    return found(call)


# ---------------------------------------------------------------- identities and creation
_IDENTITY = None
_register("alias detach clone lift_fresh lift_fresh_copy contiguous copy_ copy _copy_from", lambda call: _IDENTITY)
_register("_assert_async _assert_scalar _functional_assert_async", lambda call: _IDENTITY)

FACTORY_OPS = frozenset(
    "empty empty_like empty_strided new_empty new_empty_strided zeros zeros_like new_zeros ones ones_like "
    "new_ones full full_like new_full arange linspace scalar_tensor eye".split()
)
RANDOM_OPS = frozenset("bernoulli_ rand rand_like randn randn_like randint randint_like uniform_ normal_".split())
constant(" ".join(FACTORY_OPS), S, "creates a tensor from shapes and constants: consumes no values")
constant(" ".join(RANDOM_OPS), S, "draws random numbers (a dropout mask): consumes no values")


# ---------------------------------------------------------------- layout (views, joins, casts)
@rule("view _unsafe_view reshape _reshape_alias permute transpose t unsqueeze squeeze flatten unflatten "
      "movedim view_as_real view_as_complex")
def _relayout(call: OpCall):
    source, out = call.args[0], call.out
    if out.shape == source.shape and out.stride() == source.stride():
        return _IDENTITY
    return Verdict(S, "rearranges elements without loss")


@rule("expand repeat repeat_interleave")
def _broadcast(call: OpCall):
    if call.out.shape == call.args[0].shape:
        return _IDENTITY
    return Verdict(S, "repeats elements: any copy gives back the input")


constant("split split_with_sizes unbind tensor_split", S, "splits into pieces that together keep every element")
constant("cat stack", S, "concatenation keeps every element of every input")
constant("flip roll", S, "permutes elements")
constant("sort", S, "sorting returns the values with their indices: a permutation")


@rule("constant_pad_nd")
def _pad(call: OpCall):
    if all(amount >= 0 for amount in call.args[1]):
        return Verdict(S, "padding adds elements and keeps the input")
    return Verdict(K, "negative padding crops elements")


@rule("_to_copy")
def _cast(call: OpCall):
    source = call.args[0].dtype
    target = call.kwargs.get("dtype") or source
    if target == source:
        return _IDENTITY  # a move between devices or layouts
    if torch.promote_types(source, target) == target:
        return Verdict(S, "up-cast: the target dtype holds every source value")
    return Verdict(K, "down-cast rounds values")


@rule("slice")
def _slice(call: OpCall):
    source = call.args[0]
    dim = call.arg(1, "dim", 0) % source.dim()
    size = source.shape[dim]
    start, stop, step = call.arg(2, "start"), call.arg(3, "end"), call.arg(4, "step", 1)
    start = 0 if start is None else (start + size if start < 0 else start)
    stop = size if stop is None else (stop + size if stop < 0 else stop)
    start, stop = max(0, min(start, size)), max(0, min(stop, size))
    if step == 1 and start == 0 and stop == size:
        return _IDENTITY
    if step != 1:
        return Verdict(K, "strided slice drops elements")
    return SlicePiece(source, dim, start, stop, size)


@rule("select")
def _select(call: OpCall):
    source = call.args[0]
    dim = call.args[1] % source.dim()
    size = source.shape[dim]
    index = call.args[2] % size
    return SlicePiece(source, dim, index, index + 1, size)


PARTITION = Verdict(S, "slice of a partition: the pieces taken together keep every element")
DROPPING_SLICE = Verdict(K, "slice drops elements")


# ---------------------------------------------------------------- gathers
@rule("index index_select gather take")
def _gather(call: OpCall):
    indices = call.args[1] if call.name == "index" else call.arg(2, "index")
    indices = indices if isinstance(indices, (list, tuple)) else [indices]
    if any(index is not None and call.is_activation(index) for index in indices):
        return Verdict(GRAY, "indexing by computed indices")
    return Verdict(K, "gathers a subset of elements by fixed indices")


@rule("embedding")
def _embedding(call: OpCall):
    if call.is_activation(call.args[0]):
        return Verdict(GRAY, "lookup in a computed table")
    return Verdict(S, "embedding lookup: distinct rows identify the token")


# ---------------------------------------------------------------- element-wise maps
constant("neg reciprocal bitwise_not logical_not", S, "injective element-wise map")
constant("exp exp2 expm1 log log2 log10 log1p tanh sigmoid softplus erf erfinv asinh atan sinh logit "
         "log_sigmoid_forward elu selu celu", S, "strictly monotone element-wise map: injective")
constant("sqrt rsqrt", S, "strictly monotone on its domain (non-negative inputs): injective")
constant("cumsum", S, "prefix sum: invertible by differencing")
constant("relu relu6 threshold", K, "zeroes negative inputs")
constant("gelu silu mish hardswish", K, "non-monotone activation: different inputs share an output")
constant("hardsigmoid hardtanh clamp clamp_min clamp_max", K, "saturates: inputs beyond the limits collapse")
constant("abs sign sgn", K, "erases the sign or the magnitude")
constant("floor ceil round trunc frac remainder fmod", K, "rounding erases the fractional part")
constant("sin cos", K, "periodic: inputs a period apart share an output")
constant("isnan isinf isfinite eq ne lt le gt ge logical_and logical_or logical_xor bitwise_and bitwise_or "
         "bitwise_xor", K, "comparison or logic: keeps one bit per element")
constant("maximum minimum fmax fmin", K, "element-wise max/min erases the other operand")


@rule("leaky_relu")
def _leaky_relu(call: OpCall):
    if call.arg(1, "negative_slope", 0.01) > 0:
        return Verdict(S, "leaky ReLU with a positive slope is strictly monotone")
    return Verdict(K, "zeroes negative inputs")


@rule("pow")
def _pow(call: OpCall):
    base, exponent = call.args[0], call.args[1]
    if isinstance(base, torch.Tensor) and isinstance(exponent, torch.Tensor):
        if call.is_activation(base) and call.is_activation(exponent):
            return Verdict(GRAY, "power of two activations")
    if isinstance(exponent, (int, float)):
        if float(exponent).is_integer() and int(exponent) % 2 == 0:
            return Verdict(K, "even power erases the sign")
    return Verdict(S, "odd, fractional or exponential power: injective on its domain")


# ---------------------------------------------------------------- binary arithmetic
def _tensor_operands(call: OpCall) -> list[torch.Tensor]:
    return [value for value in call.args[:2] if isinstance(value, torch.Tensor)]


@rule("add add_ sub sub_ rsub")
def _add(call: OpCall):
    operands = _tensor_operands(call)
    if len(operands) == 2 and all(call.is_activation(value) for value in operands):
        return Verdict(S, "sum with a kept branch (residual): invertible given either operand")
    return Verdict(S, "shift by a constant or weight (bias, eps, additive mask)")


@rule("mul mul_")
def _mul(call: OpCall):
    operands = _tensor_operands(call)
    if any(call.is_random(value) for value in operands):
        return Verdict(K, "dropout: multiplication by a random 0/1 mask")
    activations = [value for value in operands if call.is_activation(value)]
    if len(activations) == 2:
        return Verdict(GRAY, "product of two activations (gating, normalisation by a computed scale)")
    others = [value for value in operands if not call.is_activation(value)]
    if any(not value.is_floating_point() for value in others):
        return Verdict(K, "multiplication by an integer or boolean mask zeroes elements")
    return Verdict(S, "scaling by a non-zero constant or weight")


@rule("div div_")
def _div(call: OpCall):
    operands = _tensor_operands(call)
    if len(operands) == 2 and all(call.is_activation(value) for value in operands):
        return Verdict(GRAY, "ratio of two activations")
    return Verdict(S, "division by or of a non-zero constant: injective")


constant("addcmul addcdiv lerp atan2", GRAY, "combines products of several activations")


# ---------------------------------------------------------------- contractions
def _linear_map(call: OpCall, left: torch.Tensor, right: torch.Tensor) -> Verdict:
    if call.is_activation(left) and call.is_activation(right):
        return Verdict(GRAY, "product of two activations (attention scores or mixing)")
    if call.is_activation(right):  # weight @ activation: the weight's rows are the output width
        width, depth = left.shape[-2], right.shape[-2]
    else:
        width, depth = right.shape[-1], left.shape[-1]
    if width >= depth:
        return Verdict(S, "linear map widens (out >= in): injective at full rank")
    return Verdict(K, "linear map narrows (out < in): erases a subspace")


_register(op_names.MATMULS, lambda call: _linear_map(call, call.args[0], call.args[1]))
_register(op_names.BIAS_MATMULS, lambda call: _linear_map(call, call.args[1], call.args[2]))


@rule(op_names.CONVOLUTIONS)
def _convolution(call: OpCall):
    source, weight, out = call.args[0], call.args[1], call.out
    if call.is_activation(source) and call.is_activation(weight):
        return Verdict(GRAY, "convolution of two activations")
    if out[0].numel() >= source[0].numel():
        return Verdict(S, "convolution with output no smaller than its input (full padding): injective")
    return Verdict(K, "convolution shrinks its input")


constant(op_names.ATTENTIONS, GRAY, "attention: values weighted by activation-derived scores")


# ---------------------------------------------------------------- reductions, normalisation, loss
constant(op_names.REDUCTIONS + " nonzero", K, "reduction: many inputs, one output")
constant(op_names.SOFTMAXES, K, "softmax normalises to a distribution: shift and scale are erased")
constant(op_names.LAYER_NORMS + " native_group_norm native_batch_norm _native_batch_norm_legit "
         "_native_batch_norm_legit_no_training",
         K, "normalisation erases each row's mean and scale")
constant(op_names.NLL_LOSSES + " " + op_names.ELEMENTWISE_LOSSES, K, "loss: reduces to a scalar")
constant("tril triu tril_ triu_", K, "zeroes a triangle")
constant("masked_fill masked_fill_ fill fill_ zero_ index_put index_put_ scatter scatter_",
         K, "overwrites elements")
constant("_local_scalar_dense", K, "reads one value into Python")


@rule("where")
def _where(call: OpCall):
    if call.is_activation(call.args[0]):
        return Verdict(GRAY, "selection by a computed condition")
    return Verdict(K, "selects elements by a fixed mask: the other values are dropped")


@rule("native_dropout")
def _native_dropout(call: OpCall):
    if call.args[1] > 0 and call.arg(2, "train") is not False:
        return Verdict(K, "dropout zeroes a random subset")
    return _IDENTITY

"""Fast stand-ins for the most frequent aten ops on meta tensors.

On the meta device, pointwise ops run their Python reference implementations (a few hundred
microseconds each) and bmm/mm their Python meta functions, which dominates the trace of a
reference selective scan (thousands of mul/add/bmm per layer). A matrix product's output shape
and dtype follow from its inputs. A pointwise op's output is the broadcast shape of its tensor
inputs, and its dtype
depends only on the input dtypes and scalar types; so the real meta kernel runs once per such
signature and later calls only allocate an empty meta tensor. Outputs are contiguous (the real
kernel keeps a transposed input's memory format), so only calls whose inputs are laid out in
row-major order take the shortcut: the op sequence stays the one the real meta kernels produce.
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default: 2, _aten.bmm.default: 3}


def matmul_applies(func, args) -> bool:
    """Whether `run_matmul` can stand in: mm/bmm of two meta tensors of one dtype and matching
    inner sizes (anything else runs the real kernel, which raises the real error)."""
    rank = _MATMULS.get(func)
    if rank is None or len(args) != 2:
        return False
    left, right = args
    return (
        left.is_meta and right.is_meta and left.dim() == rank and right.dim() == rank
        and left.dtype == right.dtype and left.shape[-1] == right.shape[-2]
        and left.shape[:-2] == right.shape[:-2]
    )


def run_matmul(args) -> torch.Tensor:
    left, right = args
    return torch.empty((*left.shape[:-1], right.shape[-1]), dtype=left.dtype, device="meta")


class MetaPointwise:
    """Runs pointwise aten ops on meta tensors, memoising the output dtype per signature."""

    def __init__(self):
        self._dtypes: dict[tuple, torch.dtype | None] = {}

    @staticmethod
    def applies(args, kwargs) -> bool:
        """Whether `run` can stand in for a pointwise op: every tensor argument is on meta, in
        row-major order (so the real kernel's output would be contiguous too)."""
        return all(
            not isinstance(value, torch.Tensor) or (value.is_meta and _row_major(value))
            for value in (*args, *kwargs.values())
        )

    def run(self, func, args, kwargs, in_place: bool):
        key = _signature(func, args, kwargs)
        if key is None or key not in self._dtypes:
            out = func(*args, **kwargs)
            if key is not None:
                usable = isinstance(out, torch.Tensor) and (in_place or out.is_contiguous())
                self._dtypes[key] = out.dtype if usable else None
            return out
        dtype = self._dtypes[key]
        if dtype is None:
            return func(*args, **kwargs)
        if in_place:
            return args[0]
        shapes = [value.shape for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        return torch.empty(_broadcast(shapes), dtype=dtype, device="meta")


def _signature(func, args, kwargs) -> tuple | None:
    """What the output dtype can depend on: tensor dtypes (0-dim ones promote differently), scalar
    types and option values; None for arguments of other kinds (never memoised)."""
    parts = [func]
    for name, value in (*enumerate(args), *sorted(kwargs.items())):
        if isinstance(value, torch.Tensor):
            parts.append((name, value.dtype, value.dim() == 0))
        elif isinstance(value, (bool, int, float)):
            parts.append((name, type(value)))
        elif value is None or isinstance(value, (str, torch.dtype)):
            parts.append((name, value))
        else:
            return None
    return tuple(parts)


def _row_major(tensor: torch.Tensor) -> bool:
    """Strides non-increasing over the dims that have more than one element."""
    previous = None
    for size, stride in zip(tensor.shape, tensor.stride()):
        if size == 1:
            continue
        if previous is not None and stride > previous:
            return False
        previous = stride
    return True


def _broadcast(shapes: list[torch.Size]) -> tuple[int, ...]:
    rank = max(len(shape) for shape in shapes)
    result = [1] * rank
    for shape in shapes:
        offset = rank - len(shape)
        for position, size in enumerate(shape):
            if size != 1:
                result[offset + position] = size
    return tuple(result)

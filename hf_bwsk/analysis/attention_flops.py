"""FLOPs of torch's fused attention ops by our own formulas, so that counts never depend on torch's
(torch 2.11's rejects grouped-query attention; releases read some layouts differently). Conventions are
torch.utils.flop_counter's; each query head counts against the key/value head it shares.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["ATTENTION_FLOP_FORMULAS", "attention_backward_flops", "attention_forward_flops"]


def attention_forward_flops(batch: int, heads: int, seq_q: int, seq_k: int, dim_qk: int, dim_v: int) -> int:
    """Q @ K^T, then scores @ V, 2 FLOPs per multiply-add; a causal mask is not discounted (as torch)."""
    return 2 * batch * heads * seq_q * seq_k * (dim_qk + dim_v)


def attention_backward_flops(batch: int, heads: int, seq_q: int, seq_k: int, dim_qk: int, dim_v: int) -> int:
    """torch's convention: the scores recomputed (Q @ K^T), then grad scores and grad V (over dim_v),
    grad Q and grad K (over dim_qk)."""
    return 2 * batch * heads * seq_q * seq_k * (3 * dim_qk + 2 * dim_v)


# The sizes below are (batch, query heads, query length, key length, q/k head dim, v head dim).

def _heads_first(query, key, value) -> tuple:
    """[batch, heads, seq, dim]: the _scaled_dot_product_* ops."""
    batch, heads, seq_q, dim_qk = query
    return batch, heads, seq_q, key[-2], dim_qk, value[-1]


def _seq_first(query, key, value) -> tuple:
    """[batch, seq, heads, dim]: the kernels the _scaled_dot_product_* ops call on CUDA."""
    batch, seq_q, heads, dim_qk = query
    return batch, heads, seq_q, key[-3], dim_qk, value[-1]


def _packed(query, key, value, offsets_q, max_q, max_k) -> tuple:
    """Variable-length sequences packed along the seq axis, [total, heads, dim] or [1, total, heads, dim].

    Shapes do not tell each sequence's length: every one counts at the longest, as torch counts
    fake tensors (real ones it counts exactly, so a real packed call may count less there).
    """
    total_q, heads, dim_qk = query[-3:]
    longest_q = total_q if max_q is None else max_q
    longest_k = key[-3] if max_k is None else max_k
    return offsets_q[0] - 1, heads, longest_q, longest_k, dim_qk, value[-1]


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return attention_forward_flops(*_heads_first(query, key, value))


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(*_heads_first(query, key, value))


def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, *args, out_shape=None, **kwargs) -> int:
    if len(query) == 4:
        return attention_forward_flops(*_seq_first(query, key, value))
    return attention_forward_flops(*_packed(query, key, value, cum_seq_q, max_q, max_k))


def _flash_forward_in_place(out, *args, **kwargs) -> int:
    return _flash_forward(*args, **kwargs)


def _flash_backward(
    grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, *args, out_shape=None, **kwargs,
) -> int:
    if len(query) == 4:
        return attention_backward_flops(*_seq_first(query, key, value))
    return attention_backward_flops(*_packed(query, key, value, cum_seq_q, max_q, max_k))


def _efficient_forward(
    query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, out_shape=None, **kwargs,
) -> int:
    # Always 4-d: packed sequences come as a batch of one, with their offsets.
    if cu_seqlens_q is None:
        return attention_forward_flops(*_seq_first(query, key, value))
    return attention_forward_flops(*_packed(query, key, value, cu_seqlens_q, max_seqlen_q, max_seqlen_k))


def _efficient_backward(
    grad_out, query, key, value, bias, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args,
    out_shape=None, **kwargs,
) -> int:
    if cu_seqlens_q is None:
        return attention_backward_flops(*_seq_first(query, key, value))
    return attention_backward_flops(*_packed(query, key, value, cu_seqlens_q, max_seqlen_q, max_seqlen_k))


_FORMULAS_BY_NAME = {
    "_scaled_dot_product_flash_attention": _sdpa_forward,
    "_scaled_dot_product_flash_attention_backward": _sdpa_backward,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward,
    "_scaled_dot_product_efficient_attention": _sdpa_forward,
    "_scaled_dot_product_efficient_attention_backward": _sdpa_backward,
    "_scaled_dot_product_cudnn_attention": _sdpa_forward,
    "_scaled_dot_product_cudnn_attention_backward": _sdpa_backward,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa_forward,
    "_scaled_dot_product_fused_attention_overrideable_backward": _sdpa_backward,
    "_scaled_dot_product_attention_math_for_mps": _sdpa_forward,
    "_flash_attention_forward": _flash_forward,
    "_flash_attention_forward_no_dropout_inplace": _flash_forward_in_place,
    "_flash_attention_backward": _flash_backward,
    "_efficient_attention_forward": _efficient_forward,
    "_efficient_attention_backward": _efficient_backward,
}

# Keyed by overload packet, each taking shapes: fn(*arg_shapes, out_shape=..., **kwarg_shapes). Passed
# to FlopCounterMode(custom_mapping=...) as they are: without `_get_raw`, torch 2.11..2.14 wrap them
# in shape_wrapper, which hands them the shapes.
ATTENTION_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {  # aten overload packet -> formula
    packet: formula
    for name, formula in _FORMULAS_BY_NAME.items()
    if (packet := getattr(torch.ops.aten, name, None)) is not None  # not every torch has every op
}

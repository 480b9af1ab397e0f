"""Fused linear cross-entropy: HF's causal-LM loss without ever holding the [tokens x vocab] logits.

The output head of a small LM dominates the activation memory of training: at Pythia-70M's vocab
(50,304) the fp32 logits alone take ~200 KB per token, more than all six decoder layers keep. The
forward here walks the tokens in chunks; per chunk it computes the logits, the fp32 cross-entropy
and, at once, the gradients w.r.t. that chunk of hidden states and the head weight (and bias). Backward
then only scales those stored gradients, so nothing is recomputed and the peak holds one chunk of
logits: one fp32 buffer, reused by every chunk and turned into its own gradient in place, sized by
`auto_chunk_size` from the vocab and hidden size. The head-weight gradient is a buffer of the
weight's shape accumulated in fp32 for fp16/bf16 weights (else in the weight's dtype). The semantics are exactly ``transformers.loss.loss_utils.ForCausalLMLoss``: labels padded with
``ignore_index`` then shifted left, logits upcast to fp32, mean over non-ignored tokens, or the sum
divided by ``num_items_in_batch`` under gradient accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import autograd_function_of
from ..errors import BWSKError

# A chunk's fp32 logits hold at most this many elements per element of the batch's hidden states.
CHUNK_LOGITS_PER_HIDDEN_ELEMENT = 4
# Each chunk also reads and writes the whole [vocab x hidden] head gradient: below this many tokens that
# traffic, not the chunk's matmul FLOPs, would set the loss' time.
MIN_CHUNK_TOKENS = 64
# Nor is a chunk made smaller than this many logits (4 MiB in fp32): below it, the dozen ops a chunk
# runs (each a kernel launch on a GPU, ~10 us of dispatch on a CPU) cost more than its bytes are worth.
MIN_CHUNK_LOGITS = 1 << 20


def auto_chunk_size(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per loss chunk: the largest power of two whose logits stay within a few times the hidden states.

    A fixed token count would let the logits buffer outgrow everything else at a large vocab (1024
    tokens x 50,304 fp32 = 206 MB beside 8 MB of Pythia-70M's 8 x 512 hidden states). Bounding it by
    ``CHUNK_LOGITS_PER_HIDDEN_ELEMENT x tokens x hidden`` elements keeps the loss' transient bytes a
    small multiple of an activation the model holds anyway, whatever the vocab, at the same FLOPs
    (more, smaller matmuls), and never below ``MIN_CHUNK_TOKENS`` tokens or ``MIN_CHUNK_LOGITS`` logits.
    """
    vocab_size = max(vocab_size, 1)
    bound = max(MIN_CHUNK_TOKENS, MIN_CHUNK_LOGITS // vocab_size,
                CHUNK_LOGITS_PER_HIDDEN_ELEMENT * tokens * hidden_size // vocab_size)
    return max(1, min(tokens, 1 << (bound.bit_length() - 1)))


def head_grad_buffers(loss) -> list[torch.Tensor]:
    """The head weight/bias gradients that the fused losses under ``loss`` (a tensor or its ``grad_fn``)
    computed in forward and still hold.

    They are the ``.grad`` backward would allocate anyway, so memory accounting reports them apart
    from activations. Found by walking ``loss``'s autograd graph to our own nodes (the backward node
    of a custom Function is its ``ctx``); empty once backward has handed them over.
    """
    buffers, pending, seen = [], [loss.grad_fn if torch.is_tensor(loss) else loss], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if autograd_function_of(node) is _FusedLinearCrossEntropy:
            buffers.extend(grad for grad in (node.grads or (None,))[1:] if grad is not None)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return buffers


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM loss of ``F.linear(hidden_states, weight, bias)`` against ``labels``, chunk by chunk.

    Equal to ``model(..., labels=labels).loss`` when ``hidden_states`` is the model's last hidden state
    and ``weight``/``bias`` its output embedding, in value and in the gradients it produces.

    Args:
        hidden_states: ``[..., hidden]`` (e.g. ``[batch, seq, hidden]``); any layout.
        weight: the output head, ``[vocab, hidden]`` (``model.get_output_embeddings().weight``).
        labels: unshifted token ids shaped like ``hidden_states[..., 0]``; ``ignore_index`` marks
            tokens without a loss. May be None when ``shift_labels`` is given.
        bias: optional head bias, ``[vocab]``.
        num_items_in_batch: when given, the loss is the sum over tokens divided by it (HF's gradient
            accumulation convention); otherwise the mean over non-ignored tokens.
        ignore_index: label value that contributes nothing.
        chunk_size: tokens per chunk; the loss holds one ``chunk_size x vocab`` fp32 buffer at a time.
            None: `auto_chunk_size` of the tokens, hidden size and vocab.
        shift_labels: already-shifted labels (as HF accepts), used instead of shifting ``labels``.

    Returns:
        A 0-dim fp32 tensor. With every token ignored it is nan (mean) like HF's, with zero gradients.
        Its backward may run once (the stored gradients are handed over to autograd).
    """
    targets = _shifted_targets(hidden_states, labels, shift_labels, ignore_index)
    if chunk_size is None:
        chunk_size = auto_chunk_size(targets.numel(), hidden_states.shape[-1], weight.shape[0])
    if chunk_size < 1:
        raise BWSKError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if weight.dim() != 2 or weight.shape[1] != hidden_states.shape[-1]:
        raise BWSKError(
            f"head weight {tuple(weight.shape)} does not match hidden size {hidden_states.shape[-1]}: "
            "pass model.get_output_embeddings().weight ([vocab, hidden])"
        )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_states, weight, bias)
    )
    if not needs_grad:
        loss, _ = _chunked_loss_and_grads(
            hidden_states, weight, bias, targets, num_items_in_batch, ignore_index, chunk_size, (False,) * 3
        )
        return loss
    return _FusedLinearCrossEntropy.apply(
        hidden_states, weight, bias, targets, num_items_in_batch, ignore_index, chunk_size
    )


def _shifted_targets(hidden_states, labels, shift_labels, ignore_index):
    """HF's target per position, flattened: labels padded with ignore_index and shifted left."""
    if shift_labels is None:
        if labels is None:
            raise BWSKError("fused_linear_cross_entropy needs labels (or shift_labels)")
        if labels.shape != hidden_states.shape[:-1]:
            raise BWSKError(
                f"labels {tuple(labels.shape)} must match hidden states {tuple(hidden_states.shape)} "
                "without the hidden dimension"
            )
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    elif shift_labels.numel() != hidden_states.numel() // hidden_states.shape[-1]:
        raise BWSKError("shift_labels must hold one target per position of hidden_states")
    return shift_labels.reshape(-1).to(hidden_states.device)


def _compute_dtype(hidden_states, weight):
    """The dtype F.linear would run the head in: the autocast dtype when autocast is on."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden_states.dtype, weight.dtype)


def _chunked_loss_and_grads(hidden_states, weight, bias, targets, num_items_in_batch, ignore_index, chunk_size,
                            needs_grad):
    """Loss (and, where ``needs_grad`` says so, grads of hidden states, weight, bias) chunk by chunk."""
    need_hidden, need_weight, need_bias = needs_grad
    hidden_dim = hidden_states.shape[-1]
    compute_dtype = _compute_dtype(hidden_states, weight)
    flat_hidden = hidden_states.reshape(-1, hidden_dim)
    head_weight = weight.to(compute_dtype)
    head_bias = None if bias is None else bias.to(compute_dtype)

    # Ignored positions (the shifted-out last token, padding) need no logits at all.
    positions = (targets != ignore_index).nonzero().squeeze(1)
    denominator = _denominator(num_items_in_batch, positions.numel(), hidden_states.device)

    # The head-gradient accumulation dtype: fp32 for fp16/bf16 weights (as a single matmul over all
    # tokens would accumulate), else the weight's own dtype; cast to the weight's dtype once at the end.
    accumulate_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    grad_hidden = (
        torch.zeros(flat_hidden.shape, dtype=hidden_states.dtype, device=hidden_states.device) if need_hidden else None
    )
    grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=accumulate_dtype, device=bias.device) if need_bias else None

    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden_states.device)
    # One fp32 logits buffer for every chunk: each chunk's logits become their own gradient in place, so
    # the chunk never holds more than this buffer (a new tensor per chunk would briefly hold two).
    logits_buffer = torch.empty((min(chunk_size, positions.numel()), weight.shape[0]), dtype=torch.float32,
                                device=hidden_states.device)
    with torch.autocast(hidden_states.device.type, enabled=False):
        for start in range(0, positions.numel(), chunk_size):
            rows = positions[start:start + chunk_size]
            chunk_hidden = flat_hidden.index_select(0, rows).to(compute_dtype)
            chunk_targets = targets.index_select(0, rows)
            logits = _chunk_logits(chunk_hidden, head_weight, head_bias, logits_buffer[:rows.numel()])
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            # log-sum-exp in place: logits -> exp(logits - max), whose row sums give the normaliser.
            maxima = logits.amax(dim=1, keepdim=True)
            exp_shifted = logits.sub_(maxima).exp_()
            sums = exp_shifted.sum(dim=1, keepdim=True)
            loss_sum += (maxima + sums.log() - target_logits[:, None]).sum()
            if not any(needs_grad):
                continue
            # d(loss)/d(logits) = (softmax - one_hot(target)) / denominator, built in place in the buffer. The
            # division waits until after the matmuls: (softmax - one_hot) lies in [-1, 1], while divided by the
            # token count of a large batch its small entries would flush to zero in fp16.
            grad_logits = exp_shifted.div_(sums)
            grad_logits[torch.arange(rows.numel(), device=rows.device), chunk_targets] -= 1
            _accumulate_chunk_grads(grad_logits.to(compute_dtype), rows, chunk_hidden, head_weight,
                                    grad_hidden, grad_weight, grad_bias)
    loss = loss_sum / denominator
    if positions.numel():  # with every token ignored the grads stay zero, as HF's
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.div_(denominator)
    grads = (
        None if grad_hidden is None else grad_hidden.view(hidden_states.shape),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    return loss, grads


def _chunk_logits(chunk_hidden, head_weight, head_bias, out):
    """``F.linear(chunk_hidden, head_weight, head_bias)`` in fp32, written into ``out``."""
    if chunk_hidden.dtype != torch.float32:  # low-precision matmul, upcast into the buffer like HF's .float()
        return out.copy_(F.linear(chunk_hidden, head_weight, head_bias))
    if head_bias is None:
        return torch.mm(chunk_hidden, head_weight.t(), out=out)
    return torch.addmm(head_bias, chunk_hidden, head_weight.t(), out=out)


def _denominator(num_items_in_batch, counted_tokens: int, device):
    """What the summed loss is divided by: HF's ``num_items_in_batch`` when given, else the counted tokens."""
    if num_items_in_batch is None:
        return counted_tokens
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device)
    return num_items_in_batch


def _accumulate_chunk_grads(grad_logits, rows, chunk_hidden, head_weight, grad_hidden, grad_weight, grad_bias):
    """Add one chunk's share to the hidden-state, weight and bias gradients (each None when not needed)."""
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, rows, (grad_logits @ head_weight).to(grad_hidden.dtype))
    if grad_weight is not None:
        if grad_logits.dtype == grad_weight.dtype:
            # The out= form, not addmm_: FLOP counters (torch.utils.flop_counter) skip addmm_.
            torch.addmm(grad_weight, grad_logits.t(), chunk_hidden, out=grad_weight)
        else:
            grad_weight += grad_logits.t() @ chunk_hidden
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes loss and gradients together; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden_states, weight, bias, targets, num_items_in_batch, ignore_index, chunk_size):
        loss, grads = _chunked_loss_and_grads(
            hidden_states, weight, bias, targets, num_items_in_batch, ignore_index, chunk_size,
            ctx.needs_input_grad[:3],
        )
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice; its gradients were computed in forward and "
                "handed over on the first backward: recompute the loss for another backward"
            )
        # Hand the buffers over (drop our reference) so autograd can adopt them as `.grad` without a copy.
        grads, ctx.grads = ctx.grads, None
        # In place: the buffers are ours alone now, and a copy would add a weight-sized tensor at the
        # moment of peak memory (start of backward) whenever grad_output != 1 (e.g. fp16 loss scaling).
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_output.to(grad.dtype))
        return *grads, None, None, None, None

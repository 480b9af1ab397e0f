"""A whole-step peak budget: what a training step may reach at most, and `auto` (the device's free memory).

A user's budget is the peak of a whole training step, weights, gradients and optimizer state
included ("does it fit on my 12 GB GPU"). The recompute plan trades activation bytes for FLOPs, so
the budget is turned into the bytes the decoder layers may keep: the predicted peak is the largest
of three moments of a reversible step,

* the fused loss (end of forward): weights + optimizer state + every kept activation + the loss'
  own buffers (head gradient, hidden-state gradient, one chunk of logits);
* the backward of the last layer: the same kept activations, the head gradient, and one layer's
  recomputed activations on top;
* the optimizer step: weights + gradients + optimizer state + the step's temporaries, or, when the
  input embeddings are tied to the head, the embedding lookup's backward, which adds two
  [vocab x hidden] tensors to a full set of gradients (the floor of any plan);

and the plan keeps the matmul outputs that save the most recompute FLOPs per byte while it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BWSKError

AUTO_BUDGET = "auto"
# `auto` leaves this share of the device's memory (at least AUTO_MARGIN_MIN_BYTES) to the CUDA context,
# allocator fragmentation and whatever else runs on the device.
AUTO_MARGIN_FRACTION = 0.1
AUTO_MARGIN_MIN_BYTES = 512 * 2**20


def auto_peak_budget(device: torch.device | str) -> int:
    """The peak a step on CUDA ``device`` may reach: memory free now plus what torch already holds, less a margin.

    What torch holds (weights loaded, its allocator's cache) counts as available: the step's peak
    includes the weights. On a device other than CUDA this is a `BWSKError`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise BWSKError(
            f"bwsk_memory_budget='auto' reads a CUDA device's free memory, and this run is on {device.type}: "
            "pass a size instead, e.g. bwsk_memory_budget='8GB'"
        )
    free, total = torch.cuda.mem_get_info(device)
    margin = max(int(total * AUTO_MARGIN_FRACTION), AUTO_MARGIN_MIN_BYTES)
    return free + torch.cuda.memory_reserved(device) - margin


@dataclass(frozen=True)
class TrainingStateBytes:
    """Bytes of the training state every plan holds at its peak: weights, their gradients, optimizer state."""

    weights: int
    grads: int
    optimizer: int
    # The optimizer step's own temporaries (`optimizer_step_transient_bytes`).
    step_transient: int = 0
    # Input embeddings tied to the output head: the lookup's backward builds a dense [vocab x hidden]
    # gradient and sums it into the head's, two such tensors beside a full set of gradients.
    tied_embedding_transient: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def state_peak(self) -> int:
        """The most the training state reaches with no activation alive: optimizer step or tied-embedding backward."""
        return self.total + max(self.step_transient, self.tied_embedding_transient)


# Optimizer state per trainable parameter byte, for optimizers whose state is created on their first step.
_STATE_PER_PARAM_BYTE = {torch.optim.AdamW: 2, torch.optim.Adam: 2, torch.optim.SGD: 1}


def training_state_bytes(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    optimizer_options: dict[str, Any] | None = None,
    device_type: str | None = None,
) -> TrainingStateBytes:
    """Weights and buffers, one gradient per trainable parameter, and the optimizer's state.

    The optimizer state is measured when the optimizer has stepped; before its first step it is
    predicted from its type (two moments for Adam/AdamW, one momentum buffer for SGD with momentum,
    two moments for any other optimizer, Adam's being the usual case). The step's temporaries follow
    the optimizer's implementation (`optimizer_step_transient_bytes`): ``optimizer.defaults``, or
    without an optimizer ``optimizer_options`` (the keyword arguments it will get) on ``device_type``
    (default: the parameters' device).
    """
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    sizes = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    trainable = sum(sizes)
    options = optimizer.defaults if optimizer is not None else optimizer_options
    device_type = device_type or next(model.parameters()).device.type
    transient = optimizer_step_transient_bytes(sizes, options, device_type)
    tied = 2 * _tied_embedding_bytes(model)
    if optimizer is None:
        return TrainingStateBytes(weights, trainable, 2 * trainable, transient, tied)
    measured = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    if measured:
        return TrainingStateBytes(weights, trainable, measured, transient, tied)
    factor = _STATE_PER_PARAM_BYTE.get(type(optimizer), 2)
    if isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults.get("momentum"):
        factor = 0
    return TrainingStateBytes(weights, trainable, factor * trainable, transient if factor else 0, tied)


def _tied_embedding_bytes(model: torch.nn.Module) -> int:
    """Bytes of the input-embedding weight when it is the (trainable) output head's too, else 0."""
    get_input, get_output = (getattr(model, name, None) for name in ("get_input_embeddings", "get_output_embeddings"))
    if not (callable(get_input) and callable(get_output)):
        return 0
    inputs, head = get_input(), get_output()
    weight = getattr(inputs, "weight", None)
    if weight is None or head is None or getattr(head, "weight", None) is not weight or not weight.requires_grad:
        return 0
    return weight.numel() * weight.element_size()


def optimizer_step_transient_bytes(sizes: list[int], options: dict[str, Any] | None, device_type: str) -> int:
    """The temporaries an Adam-style step allocates beside its state, by the implementation torch runs.

    ``sizes``: the trainable parameters' bytes; ``options``: the optimizer's `defaults` (or the
    keyword arguments it will be built with; None: unknown); ``device_type``: where the parameters
    live. Measured with `step_peak` on torch 2.13: the fused kernel (`fused=True`, what `Trainer`'s
    default `optim="adamw_torch_fused"` builds) allocates none; the multi-tensor one (`foreach`,
    torch's default on CUDA) one temporary per parameter at once (their square-root denominators);
    the per-tensor loop (torch's default on CPU) two temporaries of the parameter it updates. An
    unknown optimizer counts as the per-tensor loop.
    """
    if not sizes or (options or {}).get("fused"):
        return 0
    foreach = None if options is None else options.get("foreach")
    if foreach is None and options is not None:
        foreach = device_type not in ("cpu", "meta")  # torch's own default
    return sum(sizes) if foreach else 2 * max(sizes)


@dataclass(frozen=True)
class StepShape:
    """What the peak model needs of one step beside the plan: the training state and the transients.

    ``outside_bytes``: activations the model keeps outside the decoder layers (embeddings, final
    norm); ``layer_bytes``: the most one layer holds while its backward runs (every output of the
    layer recomputed at once); ``loss_bytes``: the fused loss' own buffers beside the kept
    activations (final hidden states and their gradient, one logits chunk and its temporaries);
    ``head_grad_bytes``: the head-weight gradient, alive from the loss to the optimizer step.
    """

    state: TrainingStateBytes
    outside_bytes: int
    layer_bytes: int
    loss_bytes: int
    head_grad_bytes: int


def step_shape(trace, state: TrainingStateBytes, head_weight: torch.Tensor, chunk_tokens: int) -> StepShape:
    """The `StepShape` of a training step on the traced batch (`layer_trace.LayerTrace`)."""
    records, batch = trace.records, trace.batch_size
    # What backward needs of a layer once it is recomputed: the outputs of its matmuls (FLOPs) and of
    # its K ops (whose backward reads their output or input), besides its input. Element-wise S ops'
    # outputs are transients freed in forward.
    per_layer = {index: size * batch for index, size in enumerate(trace.layer_input_bytes)}
    outside = 0
    for record in records:
        if not (record.flops > 0 or (record.kind == "K" and not record.relabels)):
            continue
        if record.layer is None:
            outside += record.output_bytes * batch
        else:
            per_layer[record.layer] = per_layer.get(record.layer, 0) + record.output_bytes * batch
    hidden_bytes = max(trace.layer_input_bytes, default=0) * batch
    vocab, hidden = head_weight.shape
    tokens = hidden_bytes // max(hidden * head_weight.element_size(), 1)
    accumulate_size = 4 if head_weight.dtype in (torch.float16, torch.bfloat16) else head_weight.element_size()
    chunk = min(chunk_tokens, max(tokens, 1))
    # final hidden states + their gradient, the fp32 logits chunk, the chunk's hidden rows and its grad rows
    loss_bytes = 2 * hidden_bytes + chunk * vocab * 4 + 2 * chunk * hidden * 4
    return StepShape(state, outside, max(per_layer.values(), default=0), loss_bytes, vocab * hidden * accumulate_size)


def predict_step_peak(kept_bytes: int, shape: StepShape) -> int:
    """The predicted whole-step peak of a plan keeping ``kept_bytes`` in the decoder layers (module docstring)."""
    return max(kept_bytes + _beside_kept_bytes(shape), shape.state.state_peak)


def _beside_kept_bytes(shape: StepShape) -> int:
    """What is alive beside the kept activations at the larger of the loss and the last layer's backward."""
    resident = shape.state.weights + shape.state.optimizer + shape.outside_bytes + shape.head_grad_bytes
    # A layer's backward holds its recomputed activations and the gradients flowing through it, but
    # never all of its recomputed outputs at once (backward frees them as it goes): `layer_bytes` alone
    # covers both, within 10% of the measured peak on both executions (test_budget).
    return resident + max(shape.loss_bytes, shape.layer_bytes)


def kept_bytes_budget(peak_budget: int, shape: StepShape, minimum_kept_bytes: int) -> int:
    """The bytes the decoder layers may keep so that the predicted peak stays within ``peak_budget``.

    A budget below the peak of full recomputation (the least any plan reaches) is a `BWSKError`
    that names that minimum.
    """
    minimum_peak = predict_step_peak(minimum_kept_bytes, shape)
    if peak_budget < minimum_peak:
        raise BWSKError(
            f"bwsk_memory_budget {peak_budget / 2**20:,.0f} MiB is below the minimum whole-step peak of this "
            f"model and batch, {minimum_peak / 2**20:,.0f} MiB (every layer recomputed; weights, gradients and "
            f"optimizer state {shape.state.total / 2**20:,.0f} MiB): raise it to at least "
            f"{-(-minimum_peak // 2**20)}MiB or train a smaller batch"
        )
    return peak_budget - _beside_kept_bytes(shape)

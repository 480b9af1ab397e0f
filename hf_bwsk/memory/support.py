"""Whether the fused loss equals the model's own: the head probe, done before any step.

The fused loss replaces the model's own logits and loss, so it is used only when they are exactly a
plain linear head over the last hidden state and HF's causal-LM cross-entropy. A mismatch is
reported as a reason, and the caller keeps the model's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rng import forked_rng
from .loss import fused_linear_cross_entropy

# Inputs of a training batch that the base model must not receive.
LOSS_ONLY_INPUTS = ("labels", "num_items_in_batch", "shift_labels", "logits_to_keep", "return_dict")
# Tokens used to check the output head against the model's own logits and loss.
_HEAD_CHECK_TOKENS = 32


def distributed_refusal(fsdp_plugin=None, deepspeed_plugin=None) -> str | None:
    """Why the reversible mode cannot run under this accelerate setup (naming what can), or None.

    DDP and FSDP2 (`recipes/accelerate_configs/fsdp.yaml`) train with the gradients of conventional
    training (tests/test_distributed.py). Refused, before the first step: FSDP1 (flat parameters,
    never tested with the mode), FSDP's own activation checkpointing (the mode checkpoints the
    layers itself), CPU offload (untested: the fused loss reads the head weight in the forward),
    and DeepSpeed ZeRO-3 (the head weight is a partition outside the head's own call).
    """
    if fsdp_plugin is not None:
        if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            return ("bwsk_mode='reversible' supports FSDP version 2 only: set fsdp_version: 2 "
                    "(recipes/accelerate_configs/fsdp.yaml)")
        if getattr(fsdp_plugin, "activation_checkpointing", False):
            return ("bwsk_mode='reversible' checkpoints the decoder layers itself: set fsdp_activation_checkpointing: "
                    "false, or train with bwsk_mode='conventional' to keep FSDP's")
        if getattr(fsdp_plugin, "cpu_offload", None) and not _offload_disabled(fsdp_plugin.cpu_offload):
            return "bwsk_mode='reversible' does not support FSDP CPU offload: set fsdp_offload_params: false"
    if deepspeed_plugin is not None and getattr(deepspeed_plugin, "zero_stage", 0) == 3:
        return ("bwsk_mode='reversible' does not support DeepSpeed ZeRO-3 (the fused loss needs the whole head "
                "weight): use FSDP2 (recipes/accelerate_configs/fsdp.yaml) or ZeRO stage 1 or 2")
    return None


def _offload_disabled(offload) -> bool:
    """FSDP1's `CPUOffload(offload_params=False)` and FSDP2's `OffloadPolicy()` (the no-offload default)."""
    return getattr(offload, "offload_params", None) is False or type(offload).__name__ == "OffloadPolicy"


def is_shard(tensor) -> bool:
    """A DTensor shard (FSDP2) rather than the full tensor the fused loss needs."""
    return hasattr(tensor, "full_tensor")


def head_mismatch(model, head, batch: dict) -> str | None:
    """Compare the model's logits and loss with a plain linear head + HF's causal-LM loss."""
    inputs = {
        key: value[:1, :_HEAD_CHECK_TOKENS]
        for key, value in batch.items()
        if torch.is_tensor(value) and value.dim() == 2 and key not in LOSS_ONLY_INPUTS
    }
    labels = inputs.get("input_ids")
    if labels is None:
        return "the batch holds no input_ids to check the output head with"
    was_training = model.training
    model.eval()
    try:
        # A structural check, so in full precision: autocast rounding would blur it.
        with torch.no_grad(), forked_rng(labels.device), torch.autocast(labels.device.type, enabled=False):
            output = type(model).forward(model, **inputs, labels=labels, use_cache=False)
            hidden_states = model.base_model(**inputs, use_cache=False)[0]
            logits = F.linear(hidden_states, head.weight, getattr(head, "bias", None))
            loss = fused_linear_cross_entropy(hidden_states, head.weight, labels, bias=getattr(head, "bias", None))
    finally:
        model.train(was_training)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if head.weight.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    if output.logits is None or not torch.allclose(output.logits.float(), logits.float(), **tolerance):
        return "the logits are not a plain linear map of the last hidden state (logit scaling or soft-capping)"
    if output.loss is None or not torch.allclose(output.loss.float(), loss.float(), **tolerance):
        return "the model's loss is not HF's causal-LM cross-entropy"
    return None

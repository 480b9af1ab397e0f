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

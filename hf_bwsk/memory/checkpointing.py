"""transformers' activation-checkpointing switch under the name the installed version has.

transformers 5.23 calls it `activation_checkpointing_enable(activation_checkpointing_kwargs=...)` and
deprecates the older `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`, the only name
5.17 has. We call the new name where it exists, so no deprecated call is made on a recent version.
"""

from __future__ import annotations

from typing import Any

import torch


def checkpointing_enabled(model: torch.nn.Module) -> bool:
    """Whether HF activation checkpointing is on for ``model``."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def enable_checkpointing(model: torch.nn.Module, checkpoint_kwargs: dict[str, Any]) -> None:
    """Checkpoint every decoder layer with ``torch.utils.checkpoint`` called with ``checkpoint_kwargs``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def disable_checkpointing(model: torch.nn.Module) -> None:
    """Switch HF activation checkpointing off again."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()

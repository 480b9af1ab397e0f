"""Finding the repeated decoder layers of a causal LM, whatever the attribute is called."""

from __future__ import annotations

import torch

from ..errors import BWSKError


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The path and the `ModuleList` of the model's decoder layers (e.g. ``"gpt_neox.layers"``).

    The decoder layers are the longest `ModuleList` whose entries all share one class; when the
    config states ``num_hidden_layers``, the list must have exactly that many entries.

    Raises:
        BWSKError: if the model has no such list.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, torch.nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        if best is None or len(module) > len(best[1]):
            best = (path, module)
    if best is None:
        raise BWSKError(
            f"{type(model).__name__} has no list of {expected or 'identical'} decoder layers; "
            "pass a causal LM built by AutoModelForCausalLM"
        )
    return best

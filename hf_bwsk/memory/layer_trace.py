"""The analysis run on the first training batch, in the layers' terms: what the plan is made from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.records import OpRecord
from ..analysis.trace import trace_call
from ..rng import forked_rng
from .support import LOSS_ONLY_INPUTS


@dataclass(frozen=True)
class LayerTrace:
    """The analysis' records of one sample and what the plan needs beside them.

    ``layer_input_bytes``: per layer, the bytes of its tensor positional inputs (what a checkpointed
    layer keeps at the least); ``batch_size``: what the plan scales one sample's bytes by;
    ``hidden_size``: the layers' width (the last dimension of the first layer's first tensor input).
    """

    records: list[OpRecord]
    layer_input_bytes: list[int]
    batch_size: int
    hidden_size: int | None


def trace_layers(model, layers_path: str, layers: torch.nn.ModuleList, batch: dict) -> LayerTrace:
    """Trace the base model on the first sample of ``batch`` (train mode, RNG untouched).

    One sample keeps the trace cheap: every op's output scales with the batch alone. The trace
    runs without gradients, as the analysis does; the ops are the same.
    """
    inputs = {key: value for key, value in batch.items() if key not in LOSS_ONLY_INPUTS}
    first = {key: value[:1] if torch.is_tensor(value) and value.dim() > 0 else value for key, value in inputs.items()}
    batch_size = inputs["input_ids"].shape[0]
    input_ids = first.pop("input_ids")
    input_bytes = [0] * len(layers)
    widths: list[int] = []

    def hook(index):
        def record(module, args):
            tensors = [t for t in args if isinstance(t, torch.Tensor)]
            input_bytes[index] = sum(t.numel() * t.element_size() for t in tensors)
            if not widths and tensors and tensors[0].dim() > 0:
                widths.append(tensors[0].shape[-1])

        return record

    handles = [layer.register_forward_pre_hook(hook(index)) for index, layer in enumerate(layers)]
    was_training = model.training
    model.train()
    try:
        with forked_rng(next(model.parameters()).device):
            records, _ = trace_call(
                lambda ids: model.base_model(input_ids=ids, **first, use_cache=False),
                input_ids,
                model=model,
                layers_path=layers_path,
            )
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return LayerTrace(records, input_bytes, batch_size, widths[0] if widths else None)

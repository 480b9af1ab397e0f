"""`analyze()`: trace a causal LM's forward (with its loss) and classify every aten op."""

from __future__ import annotations

import copy
import json

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..env import versions
from ..errors import BWSKError
from .axes import AxisSizes, identifies_axes, identifying_sizes, model_sizes
from .layers import find_decoder_layers
from .module_view import ModuleView
from .report import SKReport
from .steps import group_sequence_loops
from .trace import trace_call

GRANULARITIES = ("op", "module")
_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def analyze(
    model_or_config: PreTrainedModel | PretrainedConfig,
    *,
    seq_len: int = 128,
    batch_size: int = 2,
    granularity: str = "op",
    identify_axes: bool = False,
) -> SKReport:
    """Classify every aten op of one forward (with the causal-LM loss) as S, K or Gray.

    A `PretrainedConfig` is built on the meta device (no weights allocated) in float32. A model is
    traced where it lives (meta or a real device) under ``torch.no_grad()``, in its current
    train/eval mode, and is left unchanged. The input is ``batch_size`` sequences of ``seq_len``
    token ids with an all-ones attention mask, and the labels are the ids. A loop over the sequence
    (a recurrent reference scan) is grouped into logical ops with a repeat count (`steps.py`).

    ``granularity="module"`` skips the trace and reports the published cards' leaf-module view.

    ``identify_axes=True`` rounds ``batch_size`` and ``seq_len`` up to the nearest sizes that tell
    the batch, sequence and hidden axes apart (`axes.identifying_sizes`), so that `calm_report` can
    use this trace instead of tracing again at probe sizes (what ``hf-bwsk analyze`` does at its
    default sizes). Count ratios do not depend on the sizes; bytes and FLOPs shares barely do.

    Raises:
        BWSKError: for a model or config that is not a causal LM, an unknown granularity, or
            sizes the model cannot take.
    """
    if granularity not in GRANULARITIES:
        raise BWSKError(f"unknown granularity '{granularity}'; use 'op' (aten ops) or 'module' (leaf modules)")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BWSKError(f"{name} must be a positive integer, got {value!r}")
    model = build_model(model_or_config)
    layers_path, layers = find_decoder_layers(model)
    sizes = model_sizes(model)
    if identify_axes and not identifies_axes(batch_size, seq_len, sizes):
        rounded = identifying_sizes(batch_size, seq_len, sizes)
        batch_size, seq_len = rounded.batch, rounded.sequence
    _check_length(model.config, seq_len)
    axes = AxisSizes(batch_size, seq_len) if identifies_axes(batch_size, seq_len, sizes) else None
    parameter = next(model.parameters())
    records, skipped = [], {}
    if granularity == "op":
        records, skipped = _trace(model, layers_path, axes, batch_size, seq_len, parameter.device)
        group_sequence_loops(records, seq_len)
    return SKReport(
        model_class=type(model).__name__,
        model_type=model.config.model_type,
        model_name=model.config.name_or_path or "",
        seq_len=seq_len,
        batch_size=batch_size,
        granularity=granularity,
        device=parameter.device.type,
        dtype=str(parameter.dtype).removeprefix("torch."),
        layers_path=layers_path,
        num_layers=len(layers),
        records=records,
        skipped=skipped,
        module_view=ModuleView.of(model),
        config=json.loads(model.config.to_json_string()),
        versions=versions(),
        axis_sizes={"batch": axes.batch, "sequence": axes.sequence} if axes else None,
    )


def build_model(model_or_config: PreTrainedModel | PretrainedConfig | dict) -> PreTrainedModel:
    """The causal LM itself, or one built on the meta device from a config (or a config dict)."""
    if isinstance(model_or_config, dict):
        data = dict(model_or_config)
        model_or_config = AutoConfig.for_model(data.pop("model_type"), **data)
    if isinstance(model_or_config, PretrainedConfig):
        config = copy.deepcopy(model_or_config)  # from_config writes the dtype into the config
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except ValueError as error:
            raise BWSKError(
                f"{type(config).__name__} (model_type '{config.model_type}') is not a causal LM; "
                "pass the config of a model that AutoModelForCausalLM supports"
            ) from error
    if not isinstance(model_or_config, PreTrainedModel):
        raise BWSKError(
            f"cannot analyze a {type(model_or_config).__name__}; pass a transformers causal LM or its config"
        )
    name = type(model_or_config).__name__
    if name not in _CAUSAL_LM_CLASSES and not name.endswith(("ForCausalLM", "LMHeadModel")):
        raise BWSKError(f"{name} is not a causal LM; load the model with AutoModelForCausalLM")
    return model_or_config


def _check_length(config: PretrainedConfig, seq_len: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise BWSKError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}; pass a smaller seq_len")


def _trace(model, layers_path, axes, batch_size, seq_len, device):
    vocab = model.get_input_embeddings().num_embeddings
    input_ids = (torch.arange(batch_size * seq_len, device=device) % vocab).reshape(batch_size, seq_len)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()

    def forward(ids):
        model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    return trace_call(forward, input_ids, model=model, layers_path=layers_path, axes=axes)

"""The reversible training mode: analysis-driven selective recomputation plus a fused loss.

Two mechanisms, both torch's or transformers' own:

* Every decoder layer is checkpointed by HF's activation checkpointing (the layers are
  `GradientCheckpointingLayer`s) with non-reentrant `torch.utils.checkpoint` and a `context_fn`
  from `create_selective_checkpoint_contexts`. Its policy keeps or recomputes each op as the
  `RecomputePlan` says (`plan.py`, applied by `policy.py`), the plan being derived from the S/K analysis' records
  of the first training batch: the analysis tracer runs once on that batch, where the training
  runs and under its autocast, so the plan's keys, kinds, widths and bytes are the trained ones.
* The causal-LM loss comes from `fused_linear_cross_entropy` on `model.base_model(...)`'s last
  hidden state and `model.get_output_embeddings()`, so the [tokens x vocab] logits never exist.
  This is done by giving the model *instance* a `forward` that dispatches: in training with labels
  it runs the fused path, otherwise the class' own forward. Patching the instance (not calling the
  base model from the trainer) keeps the call going through DDP's wrapper and accelerate's
  autocast wrapper, which wrap `model.forward` when the model is prepared.

Models the mode cannot support (no decoder-layer list, layers that are not
`GradientCheckpointingLayer`s, logits that are not a plain linear map of the last hidden state, a
loss other than HF's causal-LM cross-entropy) fall back to HF activation checkpointing with one
warning; `status()` then says `fallback` and why.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from transformers.modeling_outputs import CausalLMOutput

from ..errors import BWSKError
from .budget import (
    StepShape,
    kept_bytes_budget,
    predict_step_peak,
    step_shape,
    training_state_bytes,
)
from .layer_trace import trace_layers
from .loss import auto_chunk_size, fused_linear_cross_entropy
from .plan import RecomputePlan, plan_recompute
from .policy import LayerPathTracker, SelectivePolicy
from .support import LOSS_ONLY_INPUTS, unsupported_reason


class ReversibleMode:
    """Applies the reversible mode to a causal LM for the duration of a training run.

    Usage (what `BWSKTrainer` does)::

        mode = ReversibleMode(model, find_layers=find_decoder_layers)
        mode.install_forward()          # before accelerate wraps model.forward
        mode.setup(first_batch)         # on the first training step
        ...train...
        mode.teardown()                 # restores the model

    Args:
        model: the (unwrapped) causal-LM `PreTrainedModel`.
        find_layers: `model -> (path, ModuleList)` of the decoder layers (`find_decoder_layers`).
        loss_chunk_size: tokens per chunk of the fused loss (None: `auto_chunk_size` per batch).
        memory_budget_bytes: optional whole-step peak budget in bytes (see `budget.py`): the plan keeps
            what fits under it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        find_layers: Callable[[torch.nn.Module], tuple[str, torch.nn.ModuleList]],
        loss_chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
    ):
        self.model = model
        self.find_layers = find_layers
        self.loss_chunk_size = loss_chunk_size
        self.memory_budget_bytes = memory_budget_bytes
        self.plan: RecomputePlan | None = None
        self._status: dict[str, Any] = {"status": "pending", "reason": None}
        self._fused_loss = False
        self._tracker: LayerPathTracker | None = None
        self._previous_forward = None
        self._patched_forward = None
        self._had_input_grad_hooks = False
        self._checkpointing = False

    def status(self) -> dict[str, Any]:
        """`{"status": "pending"|"active"|"fallback", "reason", ...}` for results files."""
        return dict(self._status)

    # --- the fused-loss forward -------------------------------------------------------------

    def install_forward(self) -> None:
        """Give the model instance the dispatching forward (inactive until `setup` succeeds)."""
        model = self.model
        class_forward = type(model).forward
        self._previous_forward = model.__dict__.get("forward")
        mode = self

        # `wraps` keeps the class forward's signature visible: Trainer reads it to pick the batch columns.
        @functools.wraps(class_forward)
        def forward(self_model, *args, labels=None, **kwargs):
            if not (mode._fused_loss and self_model.training and labels is not None):
                return class_forward(self_model, *args, labels=labels, **kwargs)
            return mode._fused_forward(self_model, args, labels, kwargs)

        self._patched_forward = forward.__get__(model)
        model.forward = self._patched_forward

    def _fused_forward(self, model, args, labels, kwargs) -> CausalLMOutput:
        num_items_in_batch = kwargs.get("num_items_in_batch")
        shift_labels = kwargs.get("shift_labels")
        base_kwargs = {key: value for key, value in kwargs.items() if key not in LOSS_ONLY_INPUTS}
        base_kwargs["use_cache"] = False
        hidden_states = model.base_model(*args, **base_kwargs)[0]
        head = model.get_output_embeddings()
        loss = fused_linear_cross_entropy(
            hidden_states,
            head.weight,
            None if shift_labels is not None else labels,
            bias=getattr(head, "bias", None),
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.loss_chunk_size,
            shift_labels=shift_labels,
        )
        return CausalLMOutput(loss=loss)

    # --- setup ---------------------------------------------------------------------------------

    def setup(self, batch: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Check support, analyze the forward on `batch`, plan, and switch checkpointing on.

        Run it under the autocast the training uses, so the traced ops are the trained ones. Raises
        `BWSKError` for a memory budget below the minimum, before any step runs. ``optimizer`` (its
        state measured, or predicted before its first step) enters the predicted whole-step peak.
        """
        model = self.model
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise BWSKError(
                f"{type(model).__name__} supports no activation checkpointing, which the reversible mode "
                "builds on: train it with bwsk_mode='conventional' or 'analyzed'"
            )
        if model.is_activation_checkpointing:
            raise BWSKError(
                "activation checkpointing is already on for this model; the reversible mode manages it: "
                "call model.activation_checkpointing_disable() first"
            )
        self._had_input_grad_hooks = bool(getattr(model, "_require_grads_hooks", None))
        reason = unsupported_reason(model, self.find_layers, batch)
        if reason is not None:
            return self._fall_back(reason)
        layers_path, layers = self.find_layers(model)
        trace = trace_layers(model, layers_path, layers, batch)
        shape = self._step_shape(trace, batch, optimizer)
        kept_budget = None
        if self.memory_budget_bytes is not None:
            minimum_kept = sum(trace.layer_input_bytes) * trace.batch_size
            kept_budget = kept_bytes_budget(self.memory_budget_bytes, shape, minimum_kept)
        plan = plan_recompute(
            trace.records, trace.layer_input_bytes, kept_budget,
            batch_size=trace.batch_size, hidden_size=trace.hidden_size,
        )
        self.plan = plan
        self._tracker = LayerPathTracker(layers)
        self._enable_checkpointing({"use_reentrant": False, "context_fn": SelectivePolicy(plan, self._tracker)})
        self._fused_loss = True
        self._status = {
            "status": "active",
            "reason": None,
            "decoder_layers": layers_path,
            "num_layers": len(layers),
            "loss": "fused_linear_cross_entropy",
            "loss_chunk_size": self.loss_chunk_size or "auto",
            "plan": plan.summary(),
            "peak_budget_bytes": self.memory_budget_bytes,
            "predicted_peak_bytes": predict_step_peak(plan.kept_bytes, shape),
            "minimum_peak_bytes": predict_step_peak(plan.minimum_bytes, shape),
            "training_state_bytes": shape.state.total,
        }
        return self.status()

    def _step_shape(self, trace, batch: dict[str, Any], optimizer) -> StepShape:
        head_weight = self.model.get_output_embeddings().weight
        chunk = self.loss_chunk_size or auto_chunk_size(batch["input_ids"].numel(), *head_weight.shape[::-1])
        return step_shape(trace, training_state_bytes(self.model, optimizer), head_weight, chunk)

    def _enable_checkpointing(self, checkpoint_kwargs: dict[str, Any]) -> None:
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        self._checkpointing = True

    def _fall_back(self, reason: str) -> dict[str, Any]:
        warnings.warn(
            f"bwsk reversible mode is not supported for {type(self.model).__name__}: {reason}. Falling back to "
            "HF activation checkpointing of every layer (no fused loss).",
            UserWarning,
            stacklevel=3,
        )
        self._enable_checkpointing({"use_reentrant": False})
        self._status = {"status": "fallback", "reason": reason, "loss": "model"}
        return self.status()

    # --- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Undo everything: checkpointing, hooks, the forward patch (see below)."""
        self._fused_loss = False
        if self._tracker is not None:
            self._tracker.remove()
            self._tracker = None
        if self._checkpointing:
            self.model.activation_checkpointing_disable()
            # HF's enable also hooks the input embeddings to require grads; drop that unless it predates us.
            if not self._had_input_grad_hooks:
                self.model.disable_input_require_grads()
            self._checkpointing = False
        # When accelerate wrapped our forward (mixed precision), its wrapper stays: with the fused
        # path off, ours only calls the class forward, exactly what accelerate's wrapper would wrap.
        if self._patched_forward is not None and self.model.__dict__.get("forward") is self._patched_forward:
            if self._previous_forward is None:
                del self.model.forward
            else:
                self.model.forward = self._previous_forward
        self._patched_forward = None


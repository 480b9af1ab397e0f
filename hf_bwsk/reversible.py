"""The reversible training mode: analysis-driven selective recomputation plus a fused loss.

Two mechanisms, both torch's or transformers' own:

* Every decoder layer is checkpointed by HF's activation checkpointing (the layers are
  `GradientCheckpointingLayer`s) with non-reentrant `torch.utils.checkpoint` and a `context_fn`
  from `create_selective_checkpoint_contexts`. Its policy keeps or recomputes each op as the
  `RecomputePlan` says (`recompute_plan.py`), the plan being derived from the S/K analysis' records
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

import contextlib
import functools
import warnings
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutput

from .analysis.records import OpRecord
from .analysis.trace import flop_formula, trace_call
from .errors import BWSKError
from .loss import fused_linear_cross_entropy
from .recompute_plan import OpKey, RecomputePlan, plan_recompute

# Inputs of a training batch that the base model must not receive.
_LOSS_ONLY_INPUTS = ("labels", "num_items_in_batch", "shift_labels", "logits_to_keep", "return_dict")
# Tokens used to check the output head against the model's own logits and loss.
_HEAD_CHECK_TOKENS = 32


class LayerPathTracker:
    """Knows, while a forward runs, which decoder layer and which of its submodules is executing.

    The checkpoint policy sees only aten ops; these hooks give it the rest of an `OpKey`. Forward
    hooks also fire while checkpointing recomputes a layer, so the keys agree between the forward
    and the recompute. Hooks are registered on every submodule of every layer; `remove()` takes
    them all away again.
    """

    def __init__(self, layers: torch.nn.ModuleList):
        self.layer: int | None = None
        self._stack: list[str] = []
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._layer_post_hook, always_call=True))
            for name, module in layer.named_modules():
                if name:
                    self._handles.append(module.register_forward_pre_hook(self._push(name)))
                    self._handles.append(module.register_forward_hook(self._pop, always_call=True))

    @property
    def path(self) -> str:
        """Module path of the innermost running submodule, relative to its layer ('' = the layer itself)."""
        return self._stack[-1] if self._stack else ""

    def _layer_pre_hook(self, index):
        def hook(module, args):
            self.layer = index
            self._stack.clear()

        return hook

    def _layer_post_hook(self, module, args, output):
        self.layer = None

    def _push(self, name):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _SelectivePolicy:
    """`context_fn` for `torch.utils.checkpoint`: one selective-checkpoint context per layer call.

    The layer index is read when the checkpoint starts (the layer's pre-hook ran just before); the
    module path of each op comes from the tracker's hooks. Occurrences are counted separately for
    the forward and the recompute, so torch versions that ask the policy again while recomputing
    get the same answers.
    """

    def __init__(self, plan: RecomputePlan, tracker: LayerPathTracker):
        self.plan = plan
        self.tracker = tracker

    def __call__(self):
        layer = self.tracker.layer
        counts = {False: Counter(), True: Counter()}

        def policy(ctx, func, *args, **kwargs):
            path, name = self.tracker.path, str(func)
            seen = counts[ctx.is_recompute]
            occurrence = seen[(path, name)]
            seen[(path, name)] += 1
            keep = self.plan.keeps(OpKey(layer, path, name, occurrence), flop_formula(func) is not None)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)


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
        loss_chunk_size: tokens per chunk of the fused loss.
        memory_budget_bytes: optional byte budget for what the layers keep (see `plan_recompute`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        find_layers: Callable[[torch.nn.Module], tuple[str, torch.nn.ModuleList]],
        loss_chunk_size: int = 1024,
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
        base_kwargs = {key: value for key, value in kwargs.items() if key not in _LOSS_ONLY_INPUTS}
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

    def setup(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Check support, analyze the forward on `batch`, plan, and switch checkpointing on.

        Run it under the autocast the training uses, so the traced ops are the trained ones. Raises
        `BWSKError` for a memory budget below the minimum, before any step runs.
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
        reason = self._unsupported_reason(batch)
        if reason is not None:
            return self._fall_back(reason)
        layers_path, layers = self.find_layers(model)
        records, layer_input_bytes, batch_size, hidden_size = self._trace(layers_path, layers, batch)
        plan = plan_recompute(
            records, layer_input_bytes, self.memory_budget_bytes, batch_size=batch_size, hidden_size=hidden_size
        )
        self.plan = plan
        self._tracker = LayerPathTracker(layers)
        self._enable_checkpointing({"use_reentrant": False, "context_fn": _SelectivePolicy(plan, self._tracker)})
        self._fused_loss = True
        self._status = {
            "status": "active",
            "reason": None,
            "decoder_layers": layers_path,
            "num_layers": len(layers),
            "loss": "fused_linear_cross_entropy",
            "loss_chunk_size": self.loss_chunk_size,
            "plan": plan.summary(),
        }
        return self.status()

    def _unsupported_reason(self, batch) -> str | None:
        """Why the reversible mode cannot run on this model, or None."""
        try:
            layers_path, layers = self.find_layers(self.model)
        except BWSKError as error:
            return f"no decoder-layer list found ({error})"
        if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
            return f"the layers under {layers_path} are not transformers GradientCheckpointingLayers"
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.dim() != 2:
            return "the output embeddings are not a linear head with a [vocab, hidden] weight"
        return self._head_mismatch(head, batch)

    def _head_mismatch(self, head, batch) -> str | None:
        """Compare the model's logits and loss with a plain linear head + HF's causal-LM loss."""
        model = self.model
        inputs = {
            key: value[:1, :_HEAD_CHECK_TOKENS]
            for key, value in batch.items()
            if torch.is_tensor(value) and value.dim() == 2 and key not in _LOSS_ONLY_INPUTS
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
                loss = fused_linear_cross_entropy(
                    hidden_states, head.weight, labels, bias=getattr(head, "bias", None)
                )
        finally:
            model.train(was_training)
        tolerance = {"rtol": 1e-4, "atol": 1e-5} if head.weight.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        if output.logits is None or not torch.allclose(output.logits.float(), logits.float(), **tolerance):
            return "the logits are not a plain linear map of the last hidden state (logit scaling or soft-capping)"
        if output.loss is None or not torch.allclose(output.loss.float(), loss.float(), **tolerance):
            return "the model's loss is not HF's causal-LM cross-entropy"
        return None

    def _trace(self, layers_path, layers, batch) -> tuple[list[OpRecord], list[int], int, int | None]:
        """The analysis' records of the base model on the first sample of `batch` (train mode, RNG
        untouched), the bytes of each layer's tensor positional inputs (what a checkpointed layer
        keeps at the least), the batch size the plan scales those bytes by, and the layers' width
        (the last dimension of the first layer's first tensor input, its hidden states).

        One sample keeps the trace cheap: every op's output scales with the batch alone. The trace
        runs without gradients, as the analysis does; the ops are the same.
        """
        inputs = {key: value for key, value in batch.items() if key not in _LOSS_ONLY_INPUTS}
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
        model = self.model
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
        return records, input_bytes, batch_size, (widths[0] if widths else None)

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


@contextlib.contextmanager
def forked_rng(device: torch.device):
    """Run a side computation without moving the RNG streams the training draws from."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield

"""The reversible mode on a model: the layer policy and the fused loss, installed and removed.

Two pieces, each usable alone:

* the **layer policy**: every decoder layer is checkpointed by HF's activation checkpointing (the
  layers are `GradientCheckpointingLayer`s) with non-reentrant `torch.utils.checkpoint` and a
  `context_fn` that keeps or recomputes each op as the `RecomputePlan` says (`plan.py`): by default
  only inside the modules that run kept ops (`scoped.py`, no dispatch mode elsewhere in the layer),
  else through torch's selective-checkpoint dispatch mode over the whole layer (`policy.py`,
  `execution="per_op"`, also under `torch.compile`), the plan being derived from the S/K
  analysis' records of the first training batch: the tracer runs once on that batch, inside the
  training forward and so under its autocast, so the plan's keys, kinds, widths and bytes are the
  trained ones.
* the **fused loss** (`loss="fused"`): the causal-LM loss comes from `fused_linear_cross_entropy` on
  `model.base_model(...)`'s last hidden state and `model.get_output_embeddings()`, so the
  [tokens x vocab] logits never exist. With `loss="model"` the model's own forward (or one a trainer
  patched in, as TRL's chunked head) computes the loss and only the layer policy applies.

Both are reached through the model *instance*'s `forward`, which dispatches: the first training
forward plans and switches checkpointing on; a training forward with labels then runs the fused path,
anything else the forward that was there before. Patching the instance keeps the call going through
DDP's and accelerate's wrappers, which wrap `model.forward` when the model is prepared. A PEFT model
is handled through its base model (`get_base_model()`: PEFT injects its layers in place, so the LoRA
matmuls are traced, planned and trained like the rest), so the `PeftModel` itself stays untouched.

What can be decided without a batch is decided at construction: a model with no checkpointable
decoder-layer list is refused with a `BWSKError`; a model whose logits are not a plain linear map of
the last hidden state (logit scaling, soft-capping) or whose loss is not HF's causal-LM loss keeps its
own loss with one warning, and the layer policy still applies.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutput

from .._compat import has_input_require_grads_hook
from ..analysis import find_decoder_layers
from ..errors import BWSKError
from .budget import (
    StepShape,
    kept_bytes_budget,
    predict_step_peak,
    step_shape,
    training_state_bytes,
)
from .byte_size import parse_byte_size
from .checkpointing import (
    checkpointing_enabled,
    disable_checkpointing,
    enable_checkpointing,
)
from .layer_trace import trace_layers
from .loss import auto_chunk_size, fused_linear_cross_entropy
from .plan import RecomputePlan, plan_recompute
from .policy import LayerPathTracker, SelectivePolicy
from .scoped import ScopedExecution, scopes_of
from .support import LOSS_ONLY_INPUTS, head_mismatch, is_shard

LOSSES = ("fused", "model")
EXECUTIONS = ("auto", "scoped", "per_op")
# Tokens of the synthetic batch that checks the output head at construction.
_HEAD_CHECK_TOKENS = 16


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its `get_base_model()`), else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def require_causal_lm(model: torch.nn.Module, find_layers: Callable = find_decoder_layers) -> tuple[str, Any]:
    """The decoder layers of ``model`` (PEFT-unwrapped) and their path, or a `BWSKError` naming the fix."""
    model = base_causal_lm(model)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        raise BWSKError(
            f"{type(model).__name__} has no output head: the bwsk modes need a causal LM (AutoModelForCausalLM)"
        )
    return find_layers(model)


class ReversibleMode:
    """The reversible mode on one model, from `install_forward()` to `teardown()` (alias `remove()`).

    Usage (what `apply_reversible` and `BWSKMixin` do)::

        mode = ReversibleMode(model)    # checks support; raises BWSKError before any work
        mode.install_forward()          # before accelerate wraps model.forward
        ...train...                     # the first training forward plans (or call mode.setup(batch))
        mode.remove()                   # restores the model

    Args:
        model: a causal-LM `PreTrainedModel`, or a PEFT model around one.
        find_layers: `model -> (path, ModuleList)` of the decoder layers.
        loss: `"fused"` (fused linear cross-entropy) or `"model"` (the model's own loss; layer policy only).
        layer_policy: False: no selective recompute, the fused loss alone.
        loss_chunk_size: tokens per chunk of the fused loss (None: `auto_chunk_size` per batch).
        memory_budget_bytes: optional whole-step peak budget in bytes (see `budget.py`): the plan keeps
            what fits under it.
        activation_budget_bytes: optional budget for the bytes the decoder layers keep for backward
            (their inputs included), in place of a peak budget: the plan keeps the outputs worth the most
            recompute FLOPs per byte within it. For when the peak is set by the training state, not the
            activations, and a peak budget would let the plan keep everything.
        execution: how the plan runs in the checkpointed layers: `"scoped"` (plain checkpointing, keep and
            replay only inside the modules that hold kept ops: `scoped.py`), `"per_op"` (torch's
            selective-checkpoint dispatch mode over the whole layer: `policy.py`), or `"auto"` (scoped
            where the plan can be scoped and the forward is not compiled, else per-op). The status says
            which ran.
        compiled: the training forward will run under `torch.compile` (``Trainer``'s ``torch_compile``), so
            the plan runs per-op. Also detected when the first training forward is traced by dynamo, but a
            graph break before it (a dispatch mode entered in a hook) can hide that.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        find_layers: Callable[[torch.nn.Module], tuple[str, torch.nn.ModuleList]] = find_decoder_layers,
        loss: str = "fused",
        layer_policy: bool = True,
        loss_chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        activation_budget_bytes: int | None = None,
        execution: str = "auto",
        compiled: bool = False,
    ):
        if execution not in EXECUTIONS:
            raise BWSKError(f"unknown execution {execution!r} for the reversible mode: choose one of "
                            f"{', '.join(EXECUTIONS)}")
        if loss not in LOSSES:
            raise BWSKError(f"unknown loss {loss!r} for the reversible mode: choose one of {', '.join(LOSSES)}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise BWSKError(f"loss_chunk_size must be >= 1, got {loss_chunk_size}")
        if not layer_policy and loss == "model":
            raise BWSKError("layer_policy=False with loss='model' leaves nothing to apply: keep one of the two")
        if not layer_policy and (memory_budget_bytes is not None or activation_budget_bytes is not None):
            raise BWSKError("a memory budget needs the layer policy: drop the budget or set layer_policy=True")
        if memory_budget_bytes is not None and activation_budget_bytes is not None:
            raise BWSKError("a peak budget and an activation budget would each choose the plan: set only one")
        self.model = base_causal_lm(model)
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise BWSKError(
                f"{type(self.model).__name__} supports no activation checkpointing, which the reversible mode "
                "builds on: train it with bwsk_mode='conventional' or 'analyzed'"
            )
        self.find_layers = find_layers
        self.layers_path, self.layers = require_causal_lm(self.model, find_layers)
        if not all(isinstance(layer, GradientCheckpointingLayer) for layer in self.layers):
            raise BWSKError(
                f"the layers under {type(self.model).__name__}.{self.layers_path} are not transformers "
                "GradientCheckpointingLayers, which the reversible mode checkpoints: train this model with "
                "bwsk_mode='conventional' or 'analyzed'"
            )
        self.loss_chunk_size = loss_chunk_size
        self.memory_budget_bytes = memory_budget_bytes
        self.activation_budget_bytes = activation_budget_bytes
        self.layer_policy = layer_policy
        self.execution = execution
        self.compiled = compiled
        self.loss, self.loss_reason = loss, None if loss == "fused" else "asked for the model's own loss"
        if loss == "fused":
            self._check_head()
        self.plan: RecomputePlan | None = None
        # The run-time half: `ScopedExecution` or `SelectivePolicy` (per-op), as `execution` decided.
        self.policy: ScopedExecution | SelectivePolicy | None = None
        # The optimizer whose state enters the predicted whole-step peak (trainers set it before step 1).
        self.optimizer: torch.optim.Optimizer | None = None
        self._peak_prediction: dict[str, Any] = {}
        self._status: dict[str, Any] = {"status": "pending", "reason": None}
        self._pending = False
        self._tracker: LayerPathTracker | None = None
        self._previous_forward = None
        self._patched_forward = None
        self._had_input_grad_hooks = False
        self._checkpointing = False
        self._active = False
        self._execution_reason: str | None = None

    def status(self) -> dict[str, Any]:
        """`{"status": "pending"|"active", "reason", "loss", "plan", ...}` for results files."""
        return dict(self._status)

    def _check_head(self) -> None:
        """Keep the model's own loss (one warning) when the fused loss would not equal it."""
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.dim() != 2:
            reason = "the output embeddings are not a linear head with a [vocab, hidden] weight"
        else:
            vocab = weight.shape[0]
            input_ids = torch.arange(_HEAD_CHECK_TOKENS, device=weight.device).mul(7919).remainder(vocab)[None]
            batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            reason = head_mismatch(self.model, head, batch)
        if reason is not None:
            self._keep_model_loss(reason)

    def _keep_model_loss(self, reason: str) -> None:
        warnings.warn(
            f"bwsk reversible mode keeps {type(self.model).__name__}'s own loss: {reason}; only the layer "
            "policy applies (no fused loss).",
            UserWarning,
            stacklevel=4,
        )
        self.loss, self.loss_reason = "model", reason

    # --- the dispatching forward ---------------------------------------------------------------

    def install_forward(self) -> None:
        """Give the model instance the dispatching forward; the first training forward then plans."""
        if self._patched_forward is not None:
            raise BWSKError("the reversible mode is already installed on this model: call remove() first")
        model = self.model
        self._previous_forward = model.__dict__.get("forward")
        previous = model.forward  # the class forward, or one a trainer patched in (TRL's fused head)
        mode = self
        self._pending = True

        # `wraps` keeps the class forward's signature visible: Trainer reads it to pick the batch columns.
        @functools.wraps(type(model).forward)
        def forward(self_model, *args, labels=None, **kwargs):
            if mode._pending and self_model.training:
                # Traced once when compiled: scoped execution's hooks and plain contexts do not compile.
                mode._setup_eagerly(_batch_of(args, labels, kwargs), compiling=torch.compiler.is_compiling())
            if mode.loss == "fused" and mode._active and self_model.training and labels is not None:
                return mode._fused_forward(self_model, args, labels, kwargs)
            return previous(*args, labels=labels, **kwargs)

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

    # --- planning ------------------------------------------------------------------------------

    @torch.compiler.disable
    def _setup_eagerly(self, batch: dict[str, Any], compiling: bool = False) -> None:
        """`setup` from inside a forward that `torch.compile` may be tracing: the planning runs eagerly."""
        self.setup(batch, compiling=compiling)

    def setup(self, batch: dict[str, Any], optimizer: torch.optim.Optimizer | None = None, *,
              compiling: bool = False) -> dict[str, Any]:
        """Analyze the forward on `batch`, plan, and switch checkpointing on with the layer policy.

        Run it under the autocast the training uses (the dispatching forward does). Raises
        `BWSKError` for a memory budget below the minimum, before any step runs. ``compiling``: the
        training forward is compiled (`torch.compile`), so the plan runs per-op. ``optimizer``
        (default: the `optimizer` attribute, which trainers set before the first step) enters the
        predicted whole-step peak with its state, measured or predicted before its first step.
        """
        self._pending = False
        compiling = compiling or self.compiled
        optimizer = optimizer or self.optimizer
        if self.loss == "fused" and is_shard(self.model.get_output_embeddings().weight):
            self._keep_model_loss("the output head is sharded in an FSDP unit of its own, so its whole weight is "
                                  "never at hand in the model's forward: wrap it with the root module instead")
        fused = self.loss == "fused"
        plan = self._install_layer_policy(batch, optimizer, compiling) if self.layer_policy else None
        self._active = True
        self._status = {
            "status": "active",
            "reason": None,
            "decoder_layers": self.layers_path,
            "num_layers": len(self.layers),
            "loss": "fused_linear_cross_entropy" if fused else "model",
            "loss_reason": self.loss_reason,
            "loss_chunk_size": (self.loss_chunk_size or "auto") if fused else None,
            "plan": None if plan is None else plan.summary(),
            "execution": None if self.policy is None else self.policy.execution,
            "execution_reason": self._execution_reason,
            **self._peak_prediction,
            # Live: the policy counts as training runs, so results files written at the end hold the totals.
            "plan_fidelity": None if self.policy is None else self.policy.fidelity,
        }
        return self.status()

    def _install_layer_policy(self, batch: dict[str, Any], optimizer, compiling: bool = False) -> RecomputePlan:
        model = self.model
        if checkpointing_enabled(model):
            # TRL (and users) switch HF checkpointing on by default: the layer policy replaces it.
            warnings.warn(
                "bwsk reversible mode replaces the activation checkpointing already on for "
                f"{type(model).__name__} by its layer policy",
                UserWarning,
                stacklevel=3,
            )
            disable_checkpointing(model)
        self._had_input_grad_hooks = has_input_require_grads_hook(model)
        trace = trace_layers(model, self.layers_path, self.layers, batch)
        # Inside the training forward, autocast caches the trace's weight casts; the layers' forward would
        # then skip casts that their recompute in backward performs, and selective checkpointing's op
        # counts would disagree. Start the forward with an empty cache, as it would without us.
        torch.clear_autocast_cache()
        shape = self._step_shape(trace, batch, optimizer)
        kept_budget = self.activation_budget_bytes  # plan_recompute refuses one below the layer inputs
        if self.memory_budget_bytes is not None:
            minimum_kept = sum(trace.layer_input_bytes) * trace.batch_size
            kept_budget = kept_bytes_budget(self.memory_budget_bytes, shape, minimum_kept)
        plan = functools.partial(plan_recompute, trace.records, trace.layer_input_bytes, kept_budget,
                                 batch_size=trace.batch_size, hidden_size=trace.hidden_size)
        self.plan = plan()
        scopes, self._execution_reason = self._scopes(compiling)
        if scopes is None:  # torch's per-op selective checkpointing keeps or recomputes: no skipped ops
            self.plan = plan(skip_unread=False)
        self._peak_prediction = {
            "peak_budget_bytes": self.memory_budget_bytes,
            "activation_budget_bytes": self.activation_budget_bytes,
            "predicted_peak_bytes": predict_step_peak(self.plan.kept_bytes, shape),
            "minimum_peak_bytes": predict_step_peak(self.plan.minimum_bytes, shape),
            "training_state_bytes": shape.state.total,
        }
        if scopes is None:
            self._tracker = LayerPathTracker(self.layers)
            self.policy = SelectivePolicy(self.plan, self._tracker)
        else:
            self.policy = ScopedExecution(self.plan, self.layers, scopes)
        enable_checkpointing(model, {"use_reentrant": False, "context_fn": self.policy.context_fn})
        self._checkpointing = True
        return self.plan

    def _scopes(self, compiling: bool):
        """Where the plan runs scoped (`scopes_of`), or None and why it runs per-op."""
        if self.execution == "per_op":
            return None, "asked for (execution='per_op')"
        if compiling:
            reason = "the forward is compiled (torch.compile), and dynamo traces only per-op selective checkpointing"
        else:
            scopes = scopes_of(self.plan, self.layers)
            if scopes is not None:
                return scopes, None
            reason = ("the plan keeps or skips an op outside the decoder layers' submodules (one a layer runs in "
                      "its own forward)")
        if self.execution == "scoped":
            raise BWSKError(f"execution='scoped' cannot run this plan ({reason}): use execution='auto' or 'per_op'")
        warnings.warn(f"bwsk reversible mode runs its plan per-op, not scoped: {reason}", UserWarning, stacklevel=4)
        return None, reason

    def _step_shape(self, trace, batch: dict[str, Any], optimizer) -> StepShape:
        head_weight = self.model.get_output_embeddings().weight
        chunk = self.loss_chunk_size or auto_chunk_size(batch["input_ids"].numel(), *head_weight.shape[::-1])
        return step_shape(trace, training_state_bytes(self.model, optimizer), head_weight, chunk)

    # --- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Undo everything: checkpointing, hooks, the forward patch (see below)."""
        self._pending = self._active = False
        if self._tracker is not None:
            self._tracker.remove()
            self._tracker = None
        if isinstance(self.policy, ScopedExecution):
            self.policy.remove()
        if self._checkpointing:
            disable_checkpointing(self.model)
            # HF's enable also hooks the input embeddings to require grads; drop that unless it predates us.
            if not self._had_input_grad_hooks:
                self.model.disable_input_require_grads()
            self._checkpointing = False
        # When accelerate wrapped our forward (mixed precision), its wrapper stays: with the mode off,
        # ours only calls the previous forward, exactly what accelerate's wrapper would wrap.
        if self._patched_forward is not None and self.model.__dict__.get("forward") is self._patched_forward:
            if self._previous_forward is None:
                del self.model.forward
            else:
                self.model.forward = self._previous_forward
        self._patched_forward = None

    remove = teardown

    def __enter__(self) -> ReversibleMode:
        return self

    def __exit__(self, *exc_info) -> None:
        self.teardown()


def _batch_of(args: tuple, labels, kwargs: dict) -> dict[str, Any]:
    """The tensors of one forward call as a batch dict (`input_ids` may come positionally)."""
    batch = {key: value for key, value in kwargs.items() if torch.is_tensor(value)}
    if args and torch.is_tensor(args[0]):
        batch["input_ids"] = args[0]
    if labels is not None:
        batch["labels"] = labels
    if "input_ids" not in batch:
        raise BWSKError("the reversible mode plans on a training batch with input_ids: pass input_ids=...")
    return batch


def apply_reversible(
    model: torch.nn.Module,
    *,
    loss: str = "fused",
    layer_policy: bool = True,
    memory_budget: int | str | None = None,
    activation_budget: int | str | None = None,
    loss_chunk_size: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    execution: str = "auto",
) -> ReversibleMode:
    """Put ``model`` in the reversible mode; returns the handle, whose `remove()` undoes it.

    The first training forward (``model.train()``, a batch with ``input_ids``) traces the layers and
    plans what to keep; later forwards train under that plan. Works on a bare causal LM or a PEFT
    model, inside any training loop or `Trainer`.

    Args:
        model: the causal LM (or PEFT model) to train.
        loss: ``"fused"``: the causal-LM loss by fused linear cross-entropy (no logits held);
            ``"model"``: the model's own loss (use it when a trainer computes the loss itself, as TRL's).
        layer_policy: ``False``: no selective recompute in the layers, the fused loss alone.
        memory_budget: the whole training step's peak, weights, gradients and optimizer state included,
            e.g. ``"12GB"``: the plan keeps the most valuable activations that fit; None: the analysis'
            default plan. A budget no plan can meet is refused with the minimum at the first forward.
        activation_budget: instead of ``memory_budget``, the bytes the decoder layers may keep for
            backward, e.g. ``"200MB"`` (their inputs, kept by any checkpointing, are the minimum).
        loss_chunk_size: tokens per chunk of the fused loss (None: chosen from vocab and hidden size).
        optimizer: the optimizer whose state the predicted peak counts (pass it with a budget).
        execution: ``"auto"`` (default), ``"scoped"`` or ``"per_op"``: how the plan runs (`ReversibleMode`).

    Example::

        handle = hf_bwsk.apply_reversible(model, memory_budget="2GiB")
        for batch in loader:
            model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        handle.remove()
    """
    budget = None if memory_budget is None else parse_byte_size(memory_budget)
    activations = None if activation_budget is None else parse_byte_size(activation_budget)
    mode = ReversibleMode(model, loss=loss, layer_policy=layer_policy, loss_chunk_size=loss_chunk_size,
                          memory_budget_bytes=budget, activation_budget_bytes=activations, execution=execution)
    mode.optimizer = optimizer
    mode.install_forward()
    return mode

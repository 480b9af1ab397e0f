"""Every private torch, transformers and accelerate name hf_bwsk uses, and nothing else.

Each is imported or looked up here once, so a release that renames one breaks this module (and
`tests/test_compat.py`), not a training run silently. Where a supported torch lacks a private helper,
this module has our own equivalent instead. Checked on torch 2.11.0, 2.13.0 and 2.14.1, transformers
5.17.0 and 5.25.0, accelerate 1.15.0 and 1.16.0 unless a comment says otherwise; the import contract
in pyproject.toml and `tests/test_compat.py` keep these names out of every other module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: F401  (re-exported)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map  # noqa: F401  (re-exported)
from torch.utils.checkpoint import SAC_IGNORED_OPS

__all__ = [
    "CachedTensor", "IGNORED_BY_CHECKPOINT", "StorageWeakRef", "TorchDispatchMode", "flop_formula_of", "shape_formula",
    "attention_implementation", "autograd_function_of", "checkpoint_saved_tensor_hooks", "detach_for_cache",
    "has_input_require_grads_hook", "in_backward", "local_attention_function", "op_packet", "op_schema",
    "outside_dispatch_modes", "tensor_version", "view_base",
]

# Ops torch's selective checkpointing neither asks its policy about nor caches (detach, which it inserts
# a different number of times in the forward and the recompute, and tensor-metadata queries): our scopes
# skip the same ones, so their op counts agree with the per-op path's.
IGNORED_BY_CHECKPOINT = frozenset(SAC_IGNORED_OPS)

# Runs a function with no dispatch mode active (probing what an op saves, outside a scope's mode).
outside_dispatch_modes = _disable_current_modes


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's version counter: bumped by every in-place write (no public accessor exists)."""
    return tensor._version


def view_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor a view was taken of (None for a tensor that is not a view)."""
    return tensor._base


def op_schema(func):
    """An aten overload's schema (arguments, returns, alias information)."""
    return func._schema


def op_packet(func):
    """The overload packet an aten overload belongs to (``aten.mm`` for ``aten.mm.default``)."""
    return func._overloadpacket


def detach_for_cache(value: Any) -> Any:
    """A tensor detached for a checkpoint's cache so that a view op's output keeps its version counter.

    What torch's own caching mode does (`_detach_helper` on 2.13+; 2.11's `_maybe_detach` skips integer
    outputs that alias nothing, which gains nothing here): detach with the ADInplaceOrView key left on, so that a view made below autograd shares its base's counter and
    `as_view` sees no autograd metadata when the cached output is handed back. Non-tensors pass through.
    """
    if not isinstance(value, torch.Tensor):
        return value
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return value.detach()


class CachedTensor:
    """A cached op output with the version it had when cached; `get_val` refuses it once written in place.

    Our equivalent of torch's `_VersionWrapper` (same `get_val(allow_cache_entry_mutation)` surface), so
    the scoped execution needs no checkpoint internals.
    """

    __slots__ = ("val", "version")

    def __init__(self, val: Any):
        self.val = val
        self.version = tensor_version(val) if isinstance(val, torch.Tensor) else None

    def get_val(self, allow_cache_entry_mutation: bool) -> Any:
        if self.version is not None and not allow_cache_entry_mutation and tensor_version(self.val) != self.version:
            raise RuntimeError("bwsk: a tensor kept for the recompute was modified in place after it was kept")
        return self.val


def checkpoint_saved_tensor_hooks() -> tuple | None:
    """The (pack, unpack) saved-tensor hooks active now (a checkpoint's), or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def autograd_function_of(node) -> type | None:
    """The `torch.autograd.Function` class whose backward ``node`` is (None for built-in nodes)."""
    return getattr(node, "_forward_cls", None)


def attention_implementation(config) -> str | None:
    """The attention implementation a transformers model runs (``"sdpa"``, ``"eager"``, ...)."""
    return getattr(config, "_attn_implementation", None)


def local_attention_function(name: str):
    """The function registered for ``name`` in transformers' attention registry by this process (not a
    built-in default), or None: what removing our own registration must restore."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS._local_mapping.get(name)


def has_input_require_grads_hook(model: torch.nn.Module) -> bool:
    """Whether `enable_input_require_grads()` has hooked the model's input embeddings."""
    return bool(getattr(model, "_require_grads_hooks", None))


def flop_formula_of(packet):
    """torch's registered FLOP formula of an aten overload packet (`torch.utils.flop_counter`'s registry,
    not in its ``__all__``), or None."""
    from torch.utils.flop_counter import flop_registry

    return flop_registry.get(packet)


def shape_formula(formula):
    """``formula`` (taking shapes) as the registry holds formulas: called with tensors, it is handed their
    shapes; its ``__wrapped__`` is the shape function itself."""
    from torch.utils.flop_counter import shape_wrapper

    return shape_wrapper(formula)

"""The `F.scaled_dot_product_attention` call of a scoped `sdpa` attention: kept in the forward, replayed with no dispatch mode.

`ScopedExecution` runs a scoped attention module's call of transformers' `sdpa` function under
`KernelCall`, a `TorchFunctionMode` (a few us a call, where a dispatch mode costs ~20 us an op) that
lets the function's reshapes and transposes pass and acts on its one `F.scaled_dot_product_attention`:

* forward: the call runs in the layer call's dispatch mode (`_Record` decides the kernel's ops by
  their `OpKey` and caches the kept outputs), while a saved-tensor hook nested in the checkpoint's
  notes, and hands on to the checkpoint, the tensors the kernel saves for backward. Each is matched to
  a tensor argument of the call or to a cached output: the call's *layout*.
* recompute: when the layout is known, `_ReplayedKernel` hands back the call's cached result and
  saves, in the forward's order, the same tensors (the recomputed arguments, the cached outputs),
  which backward then unpacks into the forward's graph: neither the kernel nor the dispatch mode runs.
  Otherwise (a saved tensor that is neither, as a padded copy of an argument would be) the call runs
  in the dispatch mode, as any scope's recompute does (`_Replay`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from .._compat import CachedTensor, checkpoint_saved_tensor_hooks, detach_for_cache, tree_leaves


class KernelCall(TorchFunctionMode):
    """Around a scoped `sdpa` attention call of one layer call (module docstring).

    ``call``: the layer call (`scoped._LayerCall`: its ``storage``, ``counts`` and ``recompute``);
    ``open_mode``/``close_mode``: enter/leave the layer call's dispatch mode; ``name``: the scope's
    path, which keys the call's entry in the storage.
    """

    def __init__(self, call, open_mode: Callable, close_mode: Callable, name: str):
        super().__init__()
        self.call, self.open_mode, self.close_mode, self.name = call, open_mode, close_mode, name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        counts = self.call.counts
        occurrence = counts.get(self.name, 0)
        counts[self.name] = occurrence + 1
        key = (self.name, occurrence)
        if not self.call.recompute:
            return self._record(func, args, kwargs, key)
        entry = self.call.storage.pop(key, None)
        if entry is None:
            return self._in_mode(func, args, kwargs)
        return self._replay(entry, _tensor_arguments(args, kwargs))

    def _in_mode(self, func, args, kwargs):
        self.open_mode(self.call)
        try:
            return func(*args, **kwargs)
        finally:
            self.close_mode(self.call)

    def _record(self, func, args, kwargs, key):
        """The forward: the kernel in the dispatch mode; its saved tensors noted on their way to the checkpoint."""
        hooks = checkpoint_saved_tensor_hooks()
        if hooks is None:  # no checkpoint hook to hand on to: nothing to replay either
            return self._in_mode(func, args, kwargs)
        pack, unpack = hooks
        # What each saved tensor is, not the tensor: every saved variable holds this hook for its
        # lifetime, and a reference here would keep the recomputable arguments alive.
        saved: list[tuple] = []

        def note(tensor):
            saved.append(_signature(tensor))
            return pack(tensor)

        storage, counts = self.call.storage, self.call.counts
        stored_before, counts_before = set(storage), dict(counts)
        with torch.autograd.graph.saved_tensors_hooks(note, unpack):
            result = self._in_mode(func, args, kwargs)
        stored = [entry for entry in storage if entry not in stored_before]
        outputs = [leaf for entry in stored for leaf in tree_leaves(storage[entry])]
        layout = _layout(saved, _tensor_arguments(args, kwargs), outputs)
        if layout is not None and isinstance(result, torch.Tensor):
            counted = {name: count - counts_before.get(name, 0) for name, count in counts.items()
                       if count != counts_before.get(name, 0)}
            storage[key] = (CachedTensor(detach_for_cache(result)), layout, stored, counted)
        return result

    def _replay(self, entry, arguments: list[torch.Tensor]):
        """The recompute: the cached result, saving what the forward's kernel saved, in its order."""
        result, layout, stored, counted = entry
        storage, counts = self.call.storage, self.call.counts
        outputs = [leaf.get_val(False) for name in stored for leaf in tree_leaves(storage.pop(name))]
        # The ops the forward's dispatch mode counted: a later scope's replay indexes past them.
        for name, count in counted.items():
            counts[name] = counts.get(name, 0) + count
        saved = [arguments[index] if kind == "argument" else outputs[index] for kind, index in layout]
        return _ReplayedKernel.apply(result.get_val(False), *saved)


def _tensor_arguments(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]


def _signature(tensor: torch.Tensor) -> tuple:
    """Which memory a tensor views and how: a saved tensor is the argument or output itself, or a detached alias.

    Compared while the arguments and outputs are alive, and a saved tensor that is neither was alive
    when they were made, so an address is never one reused.
    """
    return tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride()


def _layout(saved: list[tuple], arguments: list[torch.Tensor], outputs: list) -> tuple | None:
    """Each saved tensor (its `_signature`) as ``("argument", i)`` or ``("output", j)``; None when one is neither."""
    arguments = [_signature(argument) for argument in arguments]
    outputs = [_signature(output.val) if isinstance(output, CachedTensor) and isinstance(output.val, torch.Tensor)
               else None for output in outputs]
    layout = []
    for signature in saved:
        found = next((("argument", i) for i, argument in enumerate(arguments) if argument == signature), None)
        if found is None:
            found = next((("output", j) for j, output in enumerate(outputs) if output == signature), None)
        if found is None:
            return None
        layout.append(found)
    return tuple(layout)


class _ReplayedKernel(torch.autograd.Function):
    """A kept attention kernel in the recompute: its cached result, saving the forward's saved tensors in order.

    As `scoped._RecomputedLinear`: this graph is discarded, never differentiated; the saves are what the
    checkpoint hands to the forward's own kernel node in backward. Its output requires grad when a saved
    tensor does, as `F.scaled_dot_product_attention`'s did: every sdpa backend saves query, key and
    value, the arguments that carry grad, so the ops after it save in the recompute what they saved in
    the forward.
    """

    @staticmethod
    def forward(ctx, result, *saved):
        ctx.save_for_backward(*saved)
        return result.detach()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("bwsk: a checkpoint's recompute graph is never differentiated")

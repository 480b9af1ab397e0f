"""Deterministic memory and compute measurements of a training step, device-independent.

Bytes kept for backward are counted as the storages a forward creates that are still alive after it
returns (the loss, and through it the autograd graph, kept alive). ``saved_tensors_hooks`` would miss
what selective activation checkpointing caches in its own dispatch mode; watching every op's output
storage sees both, and counts views and tensors saved twice once. Parameters, buffers and inputs
exist before the forward, so they are never counted.

The whole-step peak (weights, gradients, optimizer state, activations and transients, the maximum
over forward, backward and the optimizer step) is `step_peak` (from `step_peak.py`).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .._compat import StorageWeakRef, TorchDispatchMode, tree_leaves
from ..analysis.attention_flops import ATTENTION_FLOP_FORMULAS
from .loss import head_grad_buffers
from .step_peak import (
    StepPeak,
    StepPeakRecorder,
    StepPeakTracker,
    cuda_step_peak,
    step_peak,
)

__all__ = [
    "FirstStepMemory", "LiveStorageTracker", "MemoryMeasurement", "StepPeak", "StepPeakRecorder", "StepPeakTracker",
    "bytes_kept_for_backward", "count_train_flops", "cuda_step_peak", "step_peak",
]


@dataclass(frozen=True)
class MemoryMeasurement:
    """Bytes a forward left alive for backward.

    ``grad_buffer_bytes`` are parameter gradients precomputed in the forward (the fused loss's head
    weight/bias grads): the ``.grad`` backward allocates anyway, so they are reported apart from
    ``activation_bytes``.
    """

    activation_bytes: int
    grad_buffer_bytes: int
    storage_count: int

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.grad_buffer_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


class LiveStorageTracker(TorchDispatchMode):
    """Records every storage created while active; ``live_bytes()`` sums those still alive.

    Use as a context manager around a forward, or ``start()``/``stop()`` from hooks and callbacks::

        with LiveStorageTracker() as tracker:
            loss = model(**batch).loss
        kept = tracker.live_bytes(loss)  # read before backward frees the graph
        loss.backward()
    """

    def __init__(self) -> None:
        super().__init__()
        # StorageImpl pointer -> (weak reference keeping that pointer unique, latest size in bytes).
        self._created: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        input_storages = {StorageWeakRef(t.untyped_storage()).cdata for t in _tensors((args, kwargs))}
        for tensor in _tensors(outputs):
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            # Outputs aliasing an input (views, in-place ops) create nothing, unless they resized a
            # storage created earlier in this window.
            if ref.cdata in self._created or ref.cdata not in input_storages:
                self._created[ref.cdata] = (self._created.get(ref.cdata, (ref,))[0], storage.nbytes())
        return outputs

    def start(self) -> LiveStorageTracker:
        """Begin recording (same as entering the context)."""
        return self.__enter__()

    def stop(self) -> None:
        """Stop recording; the storages seen so far stay tracked for ``live_bytes()``."""
        self.__exit__(None, None, None)

    def live_bytes(self, loss=None) -> MemoryMeasurement:
        """Bytes of the storages created while recording that are alive now.

        The head gradients that fused losses under ``loss`` (a tensor or its ``grad_fn``) precomputed
        are reported apart.
        """
        gc.collect()  # reference cycles would otherwise keep dead storages alive at random
        held = [] if loss is None else head_grad_buffers(loss)
        grad_buffers = {StorageWeakRef(t.untyped_storage()).cdata for t in held}
        activation_bytes = grad_buffer_bytes = count = 0
        for cdata, (ref, nbytes) in self._created.items():
            if ref.expired():
                continue
            count += 1
            if cdata in grad_buffers:
                grad_buffer_bytes += nbytes
            else:
                activation_bytes += nbytes
        return MemoryMeasurement(activation_bytes, grad_buffer_bytes, count)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def bytes_kept_for_backward(fn: Callable[[], Any]) -> MemoryMeasurement:
    """Run the forward ``fn()`` (returning the loss) and measure what it keeps alive for backward.

    The result of ``fn`` is held while measuring, then released. Deterministic for a seeded model on
    any device, so it may be asserted in tests (unlike peak memory or time).
    """
    with LiveStorageTracker() as tracker:
        result = fn()
    measurement = tracker.live_bytes(result if torch.is_tensor(result) else None)
    del result
    return measurement


def count_train_flops(fn: Callable[[], Any]) -> int:
    """Matmul/attention FLOPs of ``fn()`` (a forward and its backward), recompute included; attention
    by our formulas (`attention_flops`: torch's reject grouped-query attention on torch 2.11)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


class FirstStepMemory:
    """Bytes the first training forward of ``model`` keeps for backward (deterministic, any device).

    Tracking starts in a forward pre-hook and is read when backward reaches the loss, i.e. after
    the forward's outputs other than the loss were dropped and before backward frees anything.
    """

    def __init__(self, model: torch.nn.Module):
        self.measurement: MemoryMeasurement | None = None
        self._tracker: LiveStorageTracker | None = None
        self._handles = [
            model.register_forward_pre_hook(self._start),
            model.register_forward_hook(self._stop),
        ]

    def _start(self, module, args):
        if module.training and self._tracker is None and self.measurement is None:
            self._tracker = LiveStorageTracker().start()

    def _stop(self, module, args, output):
        if self._tracker is None:
            return
        tracker, self._tracker = self._tracker, None
        tracker.stop()
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is not None and loss.requires_grad:
            # The node, not the tensor: its own hook would then keep it alive. Held in a list the hook
            # empties: the hook lives on that node, and a closure still holding it would form a cycle that
            # keeps the step's graph (and what checkpointing hangs on it) alive until the next gc.
            held = [loss.grad_fn]

            def measure(grad):
                self.measurement = tracker.live_bytes(held.pop())
                self.remove()

            loss.register_hook(measure)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

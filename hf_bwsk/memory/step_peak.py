"""Whole-step peak memory: the most bytes alive at once over forward, backward and the optimizer step.

What users call "peak memory" ("does it fit on my GPU") and what the published model cards report.
Measured deterministically on any device by a dispatch-mode tracker: it holds a weak reference to
every storage it sees (the inputs and outputs of every op, plus the weights, gradients and optimizer
state present at the start) and, after each op, sums the bytes of those still alive. The maximum over
the step is the peak that `torch.cuda.max_memory_allocated` would report, allocator slack aside (on
CUDA `cuda_step_peak` reads that counter instead). At the peak the live bytes are split into the
training state (weights, their gradients, optimizer state) and everything else (activations kept for
backward, recompute and loss transients).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

from .._compat import StorageWeakRef, TorchDispatchMode, in_backward, tree_leaves

PHASES = ("forward", "backward", "after_backward")


@dataclass(frozen=True)
class StepPeak:
    """The whole-step peak of one training step and what was alive at that moment.

    ``weight_bytes + grad_bytes + optimizer_bytes + activation_bytes == peak_bytes``; all are the
    bytes alive at the peak. ``activation_bytes`` is everything that is not training state: the
    activations kept for backward, recompute and loss transients. ``state_bytes`` (weights + grads
    + optimizer state at the end of the step) is the floor no checkpointing plan goes below.
    ``phase`` says where the peak fell: ``forward``, ``backward`` or ``after_backward`` (the
    optimizer step); ``method`` how it was measured (``live_storages`` or ``cuda_max_allocated``).
    """

    peak_bytes: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    state_bytes: int
    phase: str
    peak_op: str
    method: str = "live_storages"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepPeakTracker(TorchDispatchMode):
    """Sums the live bytes of every storage seen after each op; keeps the maximum and who held it.

    Holds weak references only, so the step frees tensors as it would untracked. ``seed`` registers
    storages that exist before the first op (weights, grads, optimizer state).
    """

    def __init__(self) -> None:
        super().__init__()
        # StorageImpl pointer -> (weak reference keeping that pointer unique, latest size in bytes).
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live_bytes = 0
        self.peak_bytes = 0
        self.peak_storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_op = "<start>"
        self.peak_phase = "forward"
        self._backward_seen = False

    def seed(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count these tensors' storages from now on; records the starting total as a peak candidate."""
        for tensor in tensors:
            self._see(tensor)
        self._record("<start>")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        for tensor in _tensors((args, kwargs, outputs)):
            self._see(tensor)
        self._prune()
        self._record(str(func))
        return outputs

    def _see(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        previous = self._live.get(ref.cdata)
        nbytes = storage.nbytes()
        self._live_bytes += nbytes - (previous[1] if previous else 0)
        self._live[ref.cdata] = (previous[0] if previous else ref, nbytes)

    def _prune(self) -> None:
        dead = [cdata for cdata, (ref, _) in self._live.items() if ref.expired()]
        for cdata in dead:
            self._live_bytes -= self._live.pop(cdata)[1]

    def live_bytes_of(self, storage_ids: set[int]) -> int:
        """Bytes of those of ``storage_ids`` that are alive now."""
        self._prune()
        return sum(self._live[cdata][1] for cdata in storage_ids if cdata in self._live)

    def _record(self, op: str) -> None:
        backward = in_backward()
        self._backward_seen = self._backward_seen or backward
        if self._live_bytes > self.peak_bytes:
            self.peak_bytes = self._live_bytes
            # The copy keeps the weak references: while it lives no later storage can take these addresses,
            # so the storages at the peak can be told apart at the end of the step.
            self.peak_storages = dict(self._live)
            self.peak_op = op
            self.peak_phase = "backward" if backward else "after_backward" if self._backward_seen else "forward"


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _state_tensors(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None):
    """(weights, grads, optimizer state) tensors alive now."""
    params = [] if model is None else list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        params += [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if isinstance(p, torch.Tensor) and p.grad is not None]
    state = [] if optimizer is None else _tensors([dict(s) for s in optimizer.state.values()])
    return params, grads, state


def _storage_id(tensor: torch.Tensor) -> int:
    return StorageWeakRef(tensor.untyped_storage()).cdata


def _storage_ids(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {_storage_id(t) for t in tensors}


class StepPeakRecorder:
    """`step_peak` from hooks and callbacks: ``start()`` before a step's forward, ``stop()`` after its optimizer step.

    ``model``'s parameters and buffers and ``optimizer``'s parameters, gradients and state are counted
    from the start even before an op touches them, and are told apart from activations at the peak.
    """

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer
        self._tracker: StepPeakTracker | None = None

    def start(self) -> StepPeakRecorder:
        gc.collect()  # dead reference cycles from earlier steps would otherwise count at random
        self._tracker = StepPeakTracker()
        self._weights, grads, state = _state_tensors(self.model, self.optimizer)
        self._grad_ids = _storage_ids(grads)
        self._grad_sizes = {id(p): p.grad.untyped_storage().nbytes() for p in self._weights if p.grad is not None}
        # The step may free its gradients (zero_grad) before it ends: note each one as backward fills it.
        self._handles = [p.register_post_accumulate_grad_hook(self._note_grad) for p in dict.fromkeys(self._weights)
                         if isinstance(p, torch.nn.Parameter) and p.requires_grad]
        self._tracker.__enter__()
        self._tracker.seed([*self._weights, *grads, *state])
        return self

    def _note_grad(self, param: torch.nn.Parameter) -> None:
        self._grad_ids.add(_storage_id(param.grad))
        self._grad_sizes[id(param)] = param.grad.untyped_storage().nbytes()

    def stop(self) -> StepPeak:
        tracker, self._tracker = self._tracker, None
        tracker.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        _, grads, state = _state_tensors(self.model, self.optimizer)
        self._grad_sizes.update({id(p): p.grad.untyped_storage().nbytes() for p in self._weights if p.grad is not None})
        weights, self._weights = self._weights, []
        return _attribute(tracker, _storage_ids(weights), self._grad_ids | _storage_ids(grads), _storage_ids(state),
                          sum(self._grad_sizes.values()))


def step_peak(
    fn: Callable[[], Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> StepPeak:
    """Run ``fn()`` (a whole training step: forward, backward, ``optimizer.step()``) and measure its peak.

    ``model``'s parameters and buffers and ``optimizer``'s parameters, gradients and state are counted
    from the start even before an op touches them, and are told apart from activations at the peak.
    Deterministic for a seeded model on any device, so it may be asserted in tests.
    """
    recorder = StepPeakRecorder(model, optimizer).start()
    try:
        fn()
    finally:
        peak = recorder.stop()
    return peak


def _attribute(tracker: StepPeakTracker, weight_ids: set[int], grad_ids: set[int], state_ids: set[int],
               grad_bytes: int) -> StepPeak:
    """Split the live storages at the peak into weights, grads, optimizer state and the rest."""
    parts = {"weight": 0, "grad": 0, "optimizer": 0}
    for cdata, (_, nbytes) in tracker.peak_storages.items():
        part = "weight" if cdata in weight_ids else "grad" if cdata in grad_ids else (
            "optimizer" if cdata in state_ids else None)
        if part is not None:
            parts[part] += nbytes
    # Every gradient the step produced counts once at its size, alive at the end or not.
    state_bytes = tracker.live_bytes_of(weight_ids | state_ids) + grad_bytes
    return StepPeak(
        peak_bytes=tracker.peak_bytes,
        weight_bytes=parts["weight"],
        grad_bytes=parts["grad"],
        optimizer_bytes=parts["optimizer"],
        activation_bytes=tracker.peak_bytes - sum(parts.values()),
        state_bytes=state_bytes,
        phase=tracker.peak_phase,
        peak_op=tracker.peak_op,
    )


def cuda_step_peak(fn: Callable[[], Any], device: torch.device | str | int | None = None) -> StepPeak:
    """``torch.cuda.max_memory_allocated`` over ``fn()`` (a whole training step) on a CUDA device.

    Everything allocated counts, the caller's other tensors included; only the peak and the bytes
    allocated at the start (``state_bytes``, weights and optimizer state when called between steps)
    are known, so the parts are the start bytes as weights and the rest as activations.
    """
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return StepPeak(peak_bytes=peak, weight_bytes=start, grad_bytes=0, optimizer_bytes=0,
                    activation_bytes=peak - start, state_bytes=torch.cuda.memory_allocated(device),
                    phase="unknown", peak_op="unknown", method="cuda_max_allocated")

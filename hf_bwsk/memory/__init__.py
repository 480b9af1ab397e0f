"""The memory layer: what backward keeps and what it recomputes, the fused loss, and measurement.

* `plan.py`: the recompute plan, read off the S/K analysis' records;
* `policy.py`: the selective-checkpoint policy that applies it at run time;
* `loss.py`: the fused linear cross-entropy that never holds the logits;
* `support.py`, `layer_trace.py`, `apply.py`: the support probe, the first-batch trace, and
  `ReversibleMode`, which installs and removes both on a model;
* `measure.py`: deterministic bytes-kept and FLOP counts; `step_peak.py`: the whole-step peak.
"""

from .apply import ReversibleMode
from .loss import fused_linear_cross_entropy, head_grad_buffers
from .measure import (
    FirstStepMemory,
    LiveStorageTracker,
    MemoryMeasurement,
    StepPeak,
    bytes_kept_for_backward,
    count_train_flops,
    cuda_step_peak,
    step_peak,
)
from .plan import OpKey, RecomputePlan, plan_recompute

__all__ = [
    "FirstStepMemory", "LiveStorageTracker", "MemoryMeasurement", "OpKey", "RecomputePlan", "ReversibleMode",
    "StepPeak", "bytes_kept_for_backward", "count_train_flops", "cuda_step_peak", "step_peak", "fused_linear_cross_entropy", "head_grad_buffers",
    "plan_recompute",
]

"""The memory layer: what backward keeps and what it recomputes, the fused loss, and measurement.

* `plan.py`: the recompute plan, read off the S/K analysis' records;
* `scoped.py`, `policy.py`: the plan applied at run time, inside the modules that hold kept ops
  (scoped) or per op through torch's selective-checkpoint mode;
* `loss.py`: the fused linear cross-entropy that never holds the logits;
* `support.py`, `layer_trace.py`, `apply.py`: the support probe, the first-batch trace, and
  `ReversibleMode` / `apply_reversible`, which install and remove both on a model
  (`checkpointing.py`: HF's checkpointing switch under either name; `byte_size.py`: byte sizes);
* `measure.py`: deterministic bytes-kept and FLOP counts; `step_peak.py`: the whole-step peak;
* `budget.py`: a whole-step peak budget (or `auto`) turned into what the layers may keep.
"""

from .apply import ReversibleMode, apply_reversible, base_causal_lm, require_causal_lm
from .byte_size import parse_byte_size
from .loss import fused_linear_cross_entropy, head_grad_buffers
from .measure import (
    FirstStepMemory,
    LiveStorageTracker,
    MemoryMeasurement,
    StepPeak,
    StepPeakRecorder,
    bytes_kept_for_backward,
    count_train_flops,
    cuda_step_peak,
    step_peak,
)
from .plan import OpKey, RecomputePlan, plan_recompute

__all__ = [
    "FirstStepMemory", "LiveStorageTracker", "MemoryMeasurement", "OpKey", "RecomputePlan", "ReversibleMode",
    "StepPeak", "StepPeakRecorder", "apply_reversible", "base_causal_lm", "bytes_kept_for_backward",
    "count_train_flops", "cuda_step_peak", "fused_linear_cross_entropy", "head_grad_buffers", "parse_byte_size",
    "plan_recompute", "require_causal_lm", "step_peak",
]

"""`BWSKTrainingArguments`: the stock `TrainingArguments` plus the BWSK mode and its knobs.

Every field carries `metadata={"help": ...}`, so `HfArgumentParser` exposes it as a `--flag`.
"""

import re
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..errors import BWSKError
from ..memory.budget import AUTO_BUDGET, auto_peak_budget

BWSK_MODES = ("conventional", "analyzed", "reversible")

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_byte_size(value: int | str) -> int:
    """`1048576`, `"512MB"`, `"1.5 GiB"` -> a byte count (decimal units are powers of 10, `*iB` of 2)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _BYTE_UNITS:
            raise BWSKError(
                f"cannot read {value!r} as a byte size: write a number with an optional unit, e.g. 800MB or 2GiB"
            )
        size = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if size <= 0:
        raise BWSKError(f"a byte size must be positive, got {value!r}: pass e.g. 800MB")
    return size


@dataclass
class BWSKTrainingArguments(TrainingArguments):
    """`TrainingArguments` for `BWSKTrainer`.

    `bwsk_mode` picks how the model trains: `conventional` is the stock `Trainer`; `analyzed` trains
    identically and runs the S/K + CALM analysis once at train begin (ratios logged, report JSON
    written); `reversible` lets that analysis decide, per decoder layer, which activations are kept
    for backward and which are recomputed, and computes the causal-LM loss with a fused linear
    cross-entropy, at gradients equal to conventional training.
    """

    bwsk_mode: str = field(
        default="conventional",
        metadata={
            "help": "How to train: 'conventional' (stock Trainer), 'analyzed' (same training plus the S/K + CALM "
            "analysis at train begin) or 'reversible' (analysis-driven selective recomputation and a fused "
            "linear cross-entropy: far less activation memory at the same gradients).",
            "choices": list(BWSK_MODES),
        },
    )
    bwsk_loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Reversible mode: tokens per chunk of the fused linear cross-entropy, which holds one "
            "[chunk x vocab] fp32 buffer at a time. Unset: chosen per batch from the vocab and hidden size, "
            "so that the buffer stays within a few times the batch's hidden states."
        },
    )
    bwsk_memory_budget: str | None = field(
        default=None,
        metadata={
            "help": "Reversible mode: the whole-step peak memory a training step may reach (weights, "
            "gradients, optimizer state, activations and transients, as torch.cuda.max_memory_allocated "
            "reports it), e.g. '12GB' or '800MiB', or 'auto' (CUDA only: the device's free memory less a "
            "margin). The plan keeps the matmul/attention outputs that save the most recompute FLOPs per "
            "byte while the predicted peak fits; a budget below the least any plan reaches is refused with "
            "that minimum before the first step. Unset: the analysis' default plan."
        },
    )
    bwsk_report_dir: str | None = field(
        default=None,
        metadata={"help": "Where the S/K + CALM report JSON is written (default: output_dir)."},
    )
    bwsk_analysis_seq_len: int = field(
        default=64,
        metadata={
            "help": "Sequence length of the one-off S/K trace at train begin (batch 1). Op kinds do not "
            "depend on it; a short trace keeps the start fast."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.bwsk_mode not in BWSK_MODES:
            raise BWSKError(f"unknown bwsk_mode {self.bwsk_mode!r}: choose one of {', '.join(BWSK_MODES)}")
        if self.bwsk_loss_chunk_size is not None and self.bwsk_loss_chunk_size < 1:
            raise BWSKError(f"bwsk_loss_chunk_size must be >= 1, got {self.bwsk_loss_chunk_size}")
        if self.bwsk_analysis_seq_len < 2:
            raise BWSKError(f"bwsk_analysis_seq_len must be >= 2, got {self.bwsk_analysis_seq_len}")
        if self.bwsk_memory_budget is not None:
            if self.bwsk_mode != "reversible":
                raise BWSKError("bwsk_memory_budget only applies to bwsk_mode='reversible': set the mode or drop it")
            if self.bwsk_memory_budget != AUTO_BUDGET:
                parse_byte_size(self.bwsk_memory_budget)
            elif self.use_cpu or not torch.cuda.is_available():
                raise BWSKError(
                    "bwsk_memory_budget='auto' reads a CUDA device's free memory and this run has none: "
                    "pass a size instead, e.g. bwsk_memory_budget='8GB'"
                )
        if self.bwsk_mode == "reversible" and self.activation_checkpointing:
            raise BWSKError(
                "bwsk_mode='reversible' manages activation checkpointing itself: drop activation_checkpointing"
            )

    @property
    def bwsk_memory_budget_bytes(self) -> int | None:
        """`bwsk_memory_budget` as a whole-step peak in bytes (None when unset); `auto` is read now."""
        if self.bwsk_memory_budget is None:
            return None
        if self.bwsk_memory_budget == AUTO_BUDGET:
            return auto_peak_budget(self.device)
        return parse_byte_size(self.bwsk_memory_budget)

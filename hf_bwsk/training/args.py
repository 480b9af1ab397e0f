"""`BWSKTrainingArguments`: the stock `TrainingArguments` plus the BWSK mode and its knobs.

Every field carries `metadata={"help": ...}`, so `HfArgumentParser` exposes it as a `--flag`.
"""

import warnings
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..errors import BWSKError
from ..memory.budget import AUTO_BUDGET, auto_peak_budget
from ..memory.byte_size import parse_byte_size

BWSK_MODES = ("conventional", "analyzed", "reversible")


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
    bwsk_activation_budget: str | None = field(
        default=None,
        metadata={
            "help": "Reversible mode, instead of bwsk_memory_budget: the bytes the decoder layers may keep "
            "for backward (their inputs included), e.g. '200MB'. The plan keeps the outputs worth the most "
            "recompute FLOPs per byte within it. Use it where the training state, not the activations, sets "
            "the peak (a peak budget then lets the plan keep everything). Below the decoder-layer inputs of "
            "a batch it is refused with that minimum."
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
        if self.bwsk_activation_budget is not None:
            if self.bwsk_mode != "reversible":
                raise BWSKError("bwsk_activation_budget only applies to bwsk_mode='reversible': set the mode or drop it")
            if self.bwsk_memory_budget is not None:
                raise BWSKError("bwsk_memory_budget and bwsk_activation_budget would each choose the plan: set only one")
            parse_byte_size(self.bwsk_activation_budget)
        # transformers 5.17 knows only the older name, gradient_checkpointing.
        checkpointing = getattr(self, "activation_checkpointing", None) or self.gradient_checkpointing
        if self.bwsk_mode == "reversible" and checkpointing:
            # TRL's SFTConfig turns checkpointing on by default: our layer policy replaces it, it does not fail.
            warnings.warn(
                "bwsk_mode='reversible' replaces activation_checkpointing=True by its own layer policy "
                "(set activation_checkpointing=False to silence this)",
                UserWarning,
                stacklevel=3,
            )
            self.gradient_checkpointing = False
            if hasattr(self, "activation_checkpointing"):
                self.activation_checkpointing = False

    @property
    def bwsk_memory_budget_bytes(self) -> int | None:
        """`bwsk_memory_budget` as a whole-step peak in bytes (None when unset); `auto` is read now."""
        if self.bwsk_memory_budget is None:
            return None
        if self.bwsk_memory_budget == AUTO_BUDGET:
            return auto_peak_budget(self.device)
        return parse_byte_size(self.bwsk_memory_budget)

    @property
    def bwsk_activation_budget_bytes(self) -> int | None:
        """`bwsk_activation_budget` in bytes (None when unset)."""
        return None if self.bwsk_activation_budget is None else parse_byte_size(self.bwsk_activation_budget)

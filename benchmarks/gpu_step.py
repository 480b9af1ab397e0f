"""One training step of one model in one memory mode, measured: the building blocks of `gpu.py`.

A case is a model config, a batch shape and a precision; a mode is how its activations are kept
for backward (see `MODES`). `measure_mode` trains a fresh, identically seeded model of the case for
warm-up + timed steps (AdamW; autocast; a grad scaler under fp16, as the Trainer's `fp16=True`)
and reports the peak memory, the median step time and the whole-step peak estimate of one more step.

Nothing here imports datasets, evaluate or matplotlib: a CUDA machine with only torch,
transformers, accelerate and peft runs it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from memory import SEED, apply_mode, synthetic_batch

MODES = (
    "conventional",
    "hf_checkpointing",
    "hf_checkpointing_fused_loss",
    "bwsk_reversible",
    "bwsk_reversible_budget",
)
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


@dataclass(frozen=True)
class Case:
    """A model config (built by `config()`), a batch shape and the autocast precision of its steps."""

    name: str
    config: Callable[[], object]
    batch_size: int
    seq_len: int
    precision: str
    notes: dict = field(default_factory=dict)


def build_model(case: Case, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(case.config()).to(device)
    model.train()
    return model


def autocast(case: Case, device: torch.device):
    dtype = PRECISIONS[case.precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def fused_loss(model, batch: dict) -> torch.Tensor:
    """HF's causal-LM loss through `fused_linear_cross_entropy` (chunks sized as the reversible mode's), on
    the model's own checkpointed body."""
    from hf_bwsk.memory import fused_linear_cross_entropy

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    hidden_states = model.base_model(**inputs)[0]
    head = model.get_output_embeddings()
    return fused_linear_cross_entropy(hidden_states, head.weight, batch["labels"], bias=getattr(head, "bias", None))


def set_up_mode(mode: str, model, batch: dict, budget: int | None, case: Case, device: torch.device):
    """Switch `model` to `mode`. Returns (loss function, ReversibleMode or None)."""
    if mode in ("hf_checkpointing", "hf_checkpointing_fused_loss"):
        from hf_bwsk.memory.checkpointing import enable_checkpointing

        enable_checkpointing(model, {"use_reentrant": False})
        return (fused_loss if mode.endswith("fused_loss") else _model_loss), None
    # The reversible mode traces its plan under the autocast the training runs in.
    with autocast(case, device):
        reversible = apply_mode(mode, model, batch, budget)
    return _model_loss, reversible


def _model_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


class Stepper:
    """Full training steps: autocast forward, (scaled) backward, AdamW step, grads dropped."""

    def __init__(self, model, batch: dict, loss_fn, case: Case, device: torch.device):
        self.model, self.batch, self.loss_fn, self.case, self.device = model, batch, loss_fn, case, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=case.precision == "fp16")

    def step(self) -> float:
        with autocast(self.case, self.device):
            loss = self.loss_fn(self.model, self.batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def timed_step(self) -> tuple[float, float]:
        """(loss, seconds) of one step, the device synchronised on both ends."""
        self._synchronize()
        start = time.perf_counter()
        loss = self.step()
        self._synchronize()
        return loss, time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def whole_step_estimate(stepper: Stepper) -> int:
    """Peak bytes of one full step by the deterministic whole-step tracker (any device)."""
    from hf_bwsk.memory.measure import step_peak

    return step_peak(stepper.step, model=stepper.model, optimizer=stepper.optimizer).peak_bytes


def measure_mode(case: Case, mode: str, device: torch.device, warmup: int, steps: int, budget: int | None) -> dict:
    """Train a fresh model of `case` in `mode`; peak memory, median step time, whole-step estimate."""
    model = build_model(case, device)
    batch = synthetic_batch(model.config.vocab_size, case.batch_size, case.seq_len, device)
    loss_fn, reversible = set_up_mode(mode, model, batch, budget, case, device)
    stepper = Stepper(model, batch, loss_fn, case, device)
    losses = [stepper.step() for _ in range(warmup)]  # the first step also allocates AdamW's state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = [stepper.timed_step() for _ in range(steps)]
    losses += [loss for loss, _ in timed]
    row = {"mode": mode, "first_loss": losses[0], "step_s": statistics.median(seconds for _, seconds in timed)}
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_source"] = "torch.cuda.max_memory_allocated"
    row["estimate_bytes"] = whole_step_estimate(stepper)
    if device.type != "cuda":
        row["peak_bytes"] = row["estimate_bytes"]
        row["peak_source"] = "whole-step tracker (CPU)"
    if reversible is not None:
        row["reversible"] = reversible.status()
        if "predicted_peak_bytes" in row["reversible"]:  # the plan's own prediction, before any step ran
            row["predicted_bytes"] = row["reversible"]["predicted_peak_bytes"]
        reversible.teardown()
    non_finite = [loss for loss in losses if not math.isfinite(loss)]
    if non_finite:
        return {"mode": mode, "error": f"{len(non_finite)} of {len(losses)} step losses were not finite"}
    return row


def release(device: torch.device) -> None:
    """Free what a finished mode left behind, so the next one starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

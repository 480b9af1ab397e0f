"""`BWSKCallback`: records what a training run cost and achieved, into `training_results.json`.

Works with a plain `transformers.Trainer` as well as `BWSKTrainer` (which also hands it the S/K
ratios and the reversible mode's status). Field names follow `docs/RESULTS_FORMAT.md`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..env import versions
from ..layout import TRAINING_RESULTS, write_json
from ..memory import FirstStepMemory, StepPeakRecorder

_MB = 2**20


# What may go non-finite in a log before a run is stopped as diverged.
WATCHED_LOGS = ("loss", "grad_norm", "eval_loss")


def _precision(args) -> str:
    """The autocast precision the run actually used (the flags only ask for one)."""
    from accelerate.state import AcceleratorState, is_initialized

    mixed = str(AcceleratorState().mixed_precision) if is_initialized() else "no"
    # accelerate accepts fp16 on a CPU but does not autocast there (its native_amp stays off): fp32 runs.
    if mixed == "no" or (mixed == "fp16" and torch.device(args.device).type == "cpu"):
        return "fp32"
    return mixed


def _device(args) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def perplexity(mean_nll: float) -> float:
    """exp of a token-weighted mean negative log-likelihood (inf where exp overflows, NaN stays NaN)."""
    if math.isnan(mean_nll):
        return math.nan
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


class BWSKCallback(TrainerCallback):
    """Writes `training_results.json` into `output_dir` at train end (main process only).

    Records: peak memory as the whole-step peak (weights, gradients, optimizer state, activations:
    CUDA `max_memory_allocated`, reset at train begin; on CPU `memory.step_peak` over the second
    optimizer step, the first with optimizer state, or the only one), the bytes the first forward keeps
    for backward apart, tokens/s, wall time, epochs, loss and eval curves, NaN count,
    seed, mode, precision, device, versions, hyperparameters and, with `BWSKTrainer`, the S/K/Gray
    ratios and the reversible mode's status.

    A run whose logged loss, gradient norm or eval loss is not finite is stopped there (every later
    step would be wasted) and recorded as ``diverged``: the step, the metric and its value.
    """

    def __init__(self):
        self.analysis: dict | None = None
        self.reversible: dict | None = None
        self.diverged: dict | None = None  # {"step", "metric", "value"} of the first non-finite log

    def set_analysis(self, summary: dict) -> None:
        """The S/K report summary (`SKReport.summary()`) of the trained model."""
        self.analysis = summary

    def set_reversible(self, status: dict) -> None:
        """The reversible mode's status (`ReversibleMode.status()`)."""
        self.reversible = status

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start = time.perf_counter()
        self.diverged = None
        # Trainer has loaded a resumed run's state by now: a run starting past step 0 resumed.
        self._resumed = state.global_step > 0
        self._tokens = 0
        self._seq_len = None
        self._cuda = torch.device(args.device).type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        self._memory = FirstStepMemory(model)
        self._step_peak = None
        self._peak_step = min(1, max(state.max_steps - 1, 0))
        self._peak_recorder: StepPeakRecorder | None = None
        self._token_hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)

    def _count_tokens(self, module, args, kwargs):
        if not module.training:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_tensor(input_ids):
            return
        self._seq_len = self._seq_len or int(input_ids.shape[-1])
        mask = kwargs.get("attention_mask")
        self._tokens += int(mask.sum()) if torch.is_tensor(mask) else input_ids.numel()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Stop a run whose loss or gradient norm went non-finite: every step after it is wasted."""
        if self.diverged is not None:
            return
        for metric in WATCHED_LOGS:
            value = (logs or {}).get(metric)
            value = value.item() if torch.is_tensor(value) else value
            if isinstance(value, (int, float)) and not _finite(value):
                self.diverged = {"step": state.global_step, "metric": metric, "value": str(float(value))}
                control.should_training_stop = True
                return

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The second step (the first with optimizer state), or the first after a resume from a checkpoint.
        if not self._cuda and state.global_step >= self._peak_step and self._step_peak is None:
            self._peak_recorder = StepPeakRecorder(model, optimizer).start()

    def on_step_end(self, args, state, control, **kwargs):
        if self._peak_recorder is not None:
            recorder, self._peak_recorder = self._peak_recorder, None
            self._step_peak = recorder.stop()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        wall_time = time.perf_counter() - self._start
        self._token_hook.remove()
        self._memory.remove()
        if not state.is_world_process_zero:
            return
        record = self.results(args, state, model, wall_time)
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(Path(args.output_dir) / TRAINING_RESULTS, record)

    def results(self, args, state, model, wall_time: float) -> dict:
        """The `training_results.json` record (schema: docs/RESULTS_FORMAT.md)."""
        losses = [(log["step"], log["loss"]) for log in state.log_history if "loss" in log]
        evals = [log for log in state.log_history if "eval_loss" in log]
        val_curve = [
            {"step": log["step"], "epoch": log.get("epoch"), "loss": log["eval_loss"],
             "perplexity": perplexity(log["eval_loss"])}
            for log in evals
        ]
        best = min((entry for entry in val_curve if _finite(entry["loss"])), key=lambda e: e["loss"], default=None)
        train_loss = next((log["train_loss"] for log in reversed(state.log_history) if "train_loss" in log), None)
        measured = self._memory.measurement
        step_peak = self._step_peak
        if self._cuda:
            peak_mb, peak_kind = torch.cuda.max_memory_allocated(args.device) / _MB, "cuda_max_allocated"
        else:
            peak_kind = "cpu_whole_step_peak"
            peak_mb = None if step_peak is None else step_peak.peak_bytes / _MB
        world_tokens = self._tokens * max(args.world_size, 1)
        config = getattr(model, "config", None)
        ratios = (self.analysis or {}).get("ratios", {}).get("count")
        return {
            "model_slug": getattr(config, "name_or_path", None) or None,
            "experiment": None,
            "mode": getattr(args, "bwsk_mode", "conventional"),
            "variant": None,
            "final_train_loss": losses[-1][1] if losses else train_loss,
            "best_val_metric": None if best is None else best["perplexity"],
            "best_val_loss": None if best is None else best["loss"],
            "test_metric": None,
            "test_loss": None,
            "metric_name": "perplexity",
            "epochs_completed": state.epoch,
            "total_steps": state.global_step,
            "early_stopped": self.diverged is None and state.global_step < state.max_steps,
            "wall_time_s": wall_time,
            "tokens_per_s": world_tokens / wall_time if wall_time > 0 else None,
            "peak_memory_mb": peak_mb,
            "peak_memory_kind": peak_kind,
            "bytes_kept_for_backward": None if measured is None else measured.to_dict(),
            "activation_memory_mb": None if measured is None else measured.activation_bytes / _MB,
            "step_peak": None if step_peak is None else step_peak.to_dict(),
            "loss_curve": [{"step": step, "loss": loss} for step, loss in losses],
            "val_curve": val_curve,
            "nan_count": sum(not _finite(loss) for _, loss in losses) + sum(not _finite(e["loss"]) for e in val_curve),
            "diverged": self.diverged,
            "resumed": self._resumed,
            "seed": args.seed,
            "device": _device(args),
            "precision": _precision(args),
            "s_ratio": None if ratios is None else ratios["S"],
            "k_ratio": None if ratios is None else ratios["K"],
            "gray_ratio": None if ratios is None else ratios["Gray"],
            "analysis": self.analysis,
            "reversible": self.reversible,
            "versions": versions(),
            "hyperparameters": self._hyperparameters(args),
        }

    def _hyperparameters(self, args) -> dict:
        names = (
            "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
            "max_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
            "adam_epsilon", "max_grad_norm", "optim", "fp16", "bf16", "world_size",
            "bwsk_loss_chunk_size", "bwsk_memory_budget", "bwsk_activation_budget",
        )
        found = {name: getattr(args, name) for name in names if hasattr(args, name)}
        found = {name: value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
                 for name, value in found.items()}
        found["total_train_batch_size"] = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        )
        found["seq_len"] = self._seq_len
        return found

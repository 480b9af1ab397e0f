"""`BWSKMixin`: the three BWSK modes for any `transformers.Trainer` subclass (TRL's included).

    class BWSKSFTTrainer(BWSKMixin, SFTTrainer): ...
    @dataclass
    class BWSKSFTConfig(SFTConfig, BWSKTrainingArguments): ...

* `conventional`: the wrapped trainer, untouched: no callback, no log entry.
* `analyzed`: the S/K + CALM analysis runs once before training (RNG streams untouched, so training
  stays identical); its ratios join the first regular training log entry (every reporter sees them)
  and the reports are written as JSON to `bwsk_report_dir` or `output_dir`.
* `reversible`: the same analysis, then `ReversibleMode` for the duration of `train()`. The fused
  loss is used when the trainer computes HF's loss from the model's output (`Trainer.compute_loss`
  without `compute_loss_func` or label smoothing); a trainer with its own loss path (TRL's chunked
  head, with its entropy and accuracy metrics) keeps it, and only the layer policy applies.

A `BWSKCallback` is added in the analyzed and reversible modes when none was given; it receives the
analysis and the reversible status. Unsupported models are refused at construction.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Trainer

from ..errors import BWSKError
from ..layout import ANALYSIS_HTML, CALM_REPORT, SK_REPORT
from ..memory import ReversibleMode, base_causal_lm, require_causal_lm
from ..memory.support import distributed_refusal
from ..rng import forked_rng
from .callback import BWSKCallback


class BWSKMixin:
    """Mix in before the trainer class; reads `bwsk_mode` and its knobs from `self.args`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bwsk_mode = getattr(self.args, "bwsk_mode", "conventional")
        self.sk_report = None
        self.calm_report = None
        self.reversible_mode: ReversibleMode | None = None
        self._bwsk_logs: dict[str, float] = {}
        self._reversible_reported = False
        self.bwsk_callback = next(
            (cb for cb in self.callback_handler.callbacks if isinstance(cb, BWSKCallback)), None
        )
        if self.bwsk_mode == "conventional":
            return
        if self.model_init is not None and self.bwsk_mode == "reversible":
            raise BWSKError("bwsk_mode='reversible' needs a model instance: pass model=..., not model_init=...")
        if self.model_init is None:
            require_causal_lm(self.model)
        if self.bwsk_callback is None:
            self.bwsk_callback = BWSKCallback()
            self.add_callback(self.bwsk_callback)
        if self.bwsk_mode == "reversible":
            refusal = distributed_refusal(getattr(self.accelerator.state, "fsdp_plugin", None),
                                          getattr(self.accelerator.state, "deepspeed_plugin", None))
            if refusal is not None:
                raise BWSKError(refusal)
            self.reversible_mode = ReversibleMode(
                self.model,
                loss="fused" if self._computes_hf_loss() else "model",
                loss_chunk_size=self.args.bwsk_loss_chunk_size,
                memory_budget_bytes=self.args.bwsk_memory_budget_bytes,
                activation_budget_bytes=self.args.bwsk_activation_budget_bytes,
                compiled=self.args.torch_compile,
            )

    def _computes_hf_loss(self) -> bool:
        """Whether the loss is the model's own HF causal-LM loss, the one the fused loss replaces."""
        return (
            type(self).compute_loss is Trainer.compute_loss
            and getattr(self, "compute_loss_func", None) is None
            and getattr(self, "label_smoother", None) is None
        )

    def train(self, *args, **kwargs):
        if self.bwsk_mode == "conventional":
            return super().train(*args, **kwargs)
        self.sk_report = self._analyze()
        self.bwsk_callback.set_analysis(self.sk_report.summary())
        self._bwsk_logs = self._analysis_logs()
        if self.reversible_mode is None:
            return super().train(*args, **kwargs)
        self._reversible_reported = False
        self.reversible_mode.install_forward()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.reversible_mode.teardown()

    def _analyze(self):
        """S/K + CALM analysis of the (PEFT-unwrapped) model, reports written by the main process."""
        from ..analysis import analyze, calm_report

        model = base_causal_lm(self.accelerator.unwrap_model(self.model))
        with forked_rng(next(model.parameters()).device):
            report = analyze(model, seq_len=self.args.bwsk_analysis_seq_len, batch_size=1)
            calm = calm_report(report)
        if self.is_world_process_zero():
            report_dir = Path(self.args.bwsk_report_dir or self.args.output_dir)
            report_dir.mkdir(parents=True, exist_ok=True)
            report.save_json(report_dir / SK_REPORT)
            (report_dir / CALM_REPORT).write_text(json.dumps(calm.to_dict(), indent=2) + "\n", encoding="utf-8")
        self.calm_report = calm
        self._write_html(report, None)
        return report

    def _write_html(self, report, recompute_plan: dict | None) -> None:
        """The HTML report beside the JSON ones (main process); rewritten once the recompute plan exists."""
        if self.is_world_process_zero():
            from ..analysis.html import save_html

            save_html(Path(self.args.bwsk_report_dir or self.args.output_dir) / ANALYSIS_HTML,
                      report, self.calm_report, recompute_plan)

    def _analysis_logs(self) -> dict[str, float]:
        ratios = self.sk_report.summary()["ratios"]["count"]
        logs = {"bwsk/s_ratio": ratios["S"], "bwsk/k_ratio": ratios["K"], "bwsk/gray_ratio": ratios["Gray"]}
        logs.update({f"bwsk/sync_points_{axis}": float(count) for axis, count in self.calm_report.sync_counts().items()})
        return logs

    def training_step(self, *args, **kwargs):
        if self.reversible_mode is not None and not self._reversible_reported:
            # The first forward plans: its predicted whole-step peak counts this optimizer's state.
            self.reversible_mode.optimizer = self.optimizer
        loss = super().training_step(*args, **kwargs)
        if self.reversible_mode is not None and not self._reversible_reported:
            self._report_reversible()
        return loss

    def _report_reversible(self) -> None:
        """After the first step (which planned): hand the status to the callback, queue its metrics."""
        status = self.reversible_mode.status()
        if status["status"] == "pending":
            return
        self._reversible_reported = True
        self.bwsk_callback.set_reversible(status)
        plan = status["plan"]
        self._bwsk_logs.update({
            "bwsk/reversible_active": 1.0,
            "bwsk/fused_loss": float(status["loss"] != "model"),
            "bwsk/kept_bytes_estimate": float(plan["kept_bytes_estimate"]),
            "bwsk/recompute_flops_fraction": plan["recompute_flops_fraction"],
        })
        self._write_html(self.sk_report, plan)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # The bwsk metrics join the first training entry (one with the loss), never one of their own.
        if self._bwsk_logs and ("loss" in logs or "train_loss" in logs):
            logs = {**logs, **self._bwsk_logs}
            self._bwsk_logs = {}
        super().log(logs, *args, **kwargs)

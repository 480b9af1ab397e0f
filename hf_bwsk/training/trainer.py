"""`BWSKTrainer`: the HF `Trainer` with the three BWSK modes (see `BWSKTrainingArguments`).

* `conventional`: nothing changes; same seed, same losses as `transformers.Trainer`.
* `analyzed`: the S/K + CALM analysis runs once before training (RNG streams untouched, so
  training stays identical), its ratios are logged on the first step through `self.log` (every
  reporter sees them) and the reports are written as JSON to `bwsk_report_dir` or `output_dir`.
* `reversible`: the same analysis, then `ReversibleMode` (selective recomputation planned from the
  analysis + fused linear cross-entropy) for the duration of `train()`; the model is restored after.

A `BWSKCallback` is added when none was given, and receives the analysis and reversible status.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Trainer

from ..errors import BWSKError
from ..layout import CALM_REPORT, SK_REPORT
from ..memory import ReversibleMode
from ..rng import forked_rng
from .callback import BWSKCallback


class BWSKTrainer(Trainer):
    """`transformers.Trainer` driven by `BWSKTrainingArguments.bwsk_mode`.

    Example::

        args = BWSKTrainingArguments(output_dir="out", bwsk_mode="reversible", seed=0)
        trainer = BWSKTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
        trainer.train()   # out/training_results.json, out/sk_report.json, out/calm_report.json
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bwsk_mode = getattr(self.args, "bwsk_mode", "conventional")
        if self.bwsk_mode == "reversible" and self.model_init is not None:
            raise BWSKError("bwsk_mode='reversible' needs a model instance: pass model=..., not model_init=...")
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, BWSKCallback)), None)
        if callback is None:
            callback = BWSKCallback()
            self.add_callback(callback)
        self.bwsk_callback = callback
        self.sk_report = None
        self.calm_report = None
        self.reversible_mode: ReversibleMode | None = None
        self._first_step_pending = False

    def train(self, *args, **kwargs):
        if self.bwsk_mode == "conventional":
            return super().train(*args, **kwargs)
        self.sk_report = self._analyze()
        self.bwsk_callback.set_analysis(self.sk_report.summary())
        self._first_step_pending = True
        if self.bwsk_mode == "analyzed":
            return super().train(*args, **kwargs)
        from ..analysis import find_decoder_layers

        self.reversible_mode = ReversibleMode(
            self.model,
            find_layers=find_decoder_layers,
            loss_chunk_size=self.args.bwsk_loss_chunk_size,
            memory_budget_bytes=self.args.bwsk_memory_budget_bytes,
        )
        self.reversible_mode.install_forward()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.reversible_mode.teardown()

    def _analyze(self):
        """S/K + CALM analysis of the model, reports written by the main process; RNG untouched."""
        from ..analysis import analyze, calm_report

        model = self.accelerator.unwrap_model(self.model)
        with forked_rng(next(model.parameters()).device):
            report = analyze(model, seq_len=self.args.bwsk_analysis_seq_len, batch_size=1)
            calm = calm_report(report)
        if self.is_world_process_zero():
            report_dir = Path(self.args.bwsk_report_dir or self.args.output_dir)
            report_dir.mkdir(parents=True, exist_ok=True)
            report.save_json(report_dir / SK_REPORT)
            (report_dir / CALM_REPORT).write_text(json.dumps(calm.to_dict(), indent=2) + "\n", encoding="utf-8")
        self.calm_report = calm
        return report

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._first_step_pending:
            self._first_step_pending = False
            self._start_bwsk(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _start_bwsk(self, inputs) -> None:
        """First step: set the reversible mode up on the real batch, log the analysis for every reporter."""
        ratios = self.sk_report.summary()["ratios"]["count"]
        logs = {"bwsk/s_ratio": ratios["S"], "bwsk/k_ratio": ratios["K"], "bwsk/gray_ratio": ratios["Gray"]}
        sync_counts = self.calm_report.sync_counts()
        logs.update({f"bwsk/sync_points_{axis}": float(count) for axis, count in sync_counts.items()})
        if self.reversible_mode is not None:
            with self.accelerator.autocast():
                status = self.reversible_mode.setup(self._prepare_inputs(inputs), optimizer=self.optimizer)
            self.bwsk_callback.set_reversible(status)
            logs["bwsk/reversible_active"] = float(status["status"] == "active")
            if status["status"] == "active":
                plan = status["plan"]
                logs["bwsk/kept_bytes_estimate"] = float(plan["kept_bytes_estimate"])
                logs["bwsk/recompute_flops_fraction"] = plan["recompute_flops_fraction"]
        self.log(logs)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """Write the BWSK card of this run (from its `training_results.json`) as `output_dir/README.md`."""
        if not self.is_world_process_zero():
            return
        from .model_card import render_variant_card

        model = self.accelerator.unwrap_model(self.model)
        base_model = finetuned_from or getattr(getattr(model, "config", None), "name_or_path", None) or None
        card = render_variant_card(
            self.args.output_dir, repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            base_model=base_model, dataset=dataset, license=license or "mit",
        )
        Path(self.args.output_dir, "README.md").write_text(card, encoding="utf-8")


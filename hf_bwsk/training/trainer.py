"""`BWSKTrainer`: the HF `Trainer` with the three BWSK modes (see `BWSKTrainingArguments`, `BWSKMixin`).

* `conventional`: nothing changes; same seed, same losses, same callbacks as `transformers.Trainer`.
* `analyzed`: the S/K + CALM analysis runs once before training, its ratios join the first training
  log entry and the reports are written as JSON to `bwsk_report_dir` or `output_dir`.
* `reversible`: the same analysis, then `ReversibleMode` (selective recomputation planned from the
  analysis + fused linear cross-entropy) for the duration of `train()`; the model is restored after.

Any other `Trainer` subclass gets the same modes from `BWSKMixin` (e.g. TRL's `SFTTrainer`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from ..layout import README
from .mixin import BWSKMixin


class BWSKTrainer(BWSKMixin, Trainer):
    """`transformers.Trainer` driven by `BWSKTrainingArguments.bwsk_mode`.

    Example::

        args = BWSKTrainingArguments(output_dir="out", bwsk_mode="reversible", seed=0)
        trainer = BWSKTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
        trainer.train()   # out/training_results.json, out/sk_report.json, out/calm_report.json
    """

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
        Path(self.args.output_dir, README).write_text(card, encoding="utf-8")


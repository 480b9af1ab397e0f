"""Training one variant of the grid: a ``BWSKTrainer`` run, its test, and its published folder.

Validation every epoch, early stopping on validation loss, the epoch cap, then one test evaluation
on the best checkpoint. Checkpoints go to ``checkpoints/<variant>/``; the variant folder appears
only once complete (see :mod:`hf_bwsk.experiments.run_dir`).
"""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, TrainerCallback

from ..layout import TRAINING_RESULTS, variant_name, write_json
from ..training.args import BWSKTrainingArguments
from ..training.callback import BWSKCallback, perplexity
from ..training.trainer import BWSKTrainer
from .run_dir import RunDirectory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """What every variant of one run shares, resolved and checked before any training."""

    run_dir: RunDirectory
    training_args: BWSKTrainingArguments  # the user's; each variant derives its own from them
    slug: str
    base: str  # Hub id or directory of the pretrained model "finetune" starts from
    config: PretrainedConfig  # its config: "scratch" starts from it with random weights
    tokenizer: Any
    blocks: Any  # DatasetDict of packed train / validation / test blocks
    block_size: int
    learning_rates: dict[str, float]  # experiment -> peak learning rate
    max_epochs: int
    early_stopping_patience: int
    resume: bool
    callbacks: tuple = ()


class LogBeforeCheckpoint(TrainerCallback):
    """Logs the training loss whenever a checkpoint is about to be saved.

    Trainer restarts its logging interval when it resumes, so a logged mean that straddled the
    checkpoint would differ between a resumed and an uninterrupted run; closing the interval at
    every checkpoint makes their loss curves identical.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True


def variant_arguments(grid: Grid, experiment: str, mode: str) -> BWSKTrainingArguments:
    """The user's training arguments, specialised for one variant."""
    args = grid.training_args
    return dataclasses.replace(
        args,
        output_dir=str(grid.run_dir.checkpoints / variant_name(experiment, mode)),
        bwsk_mode=mode,
        bwsk_memory_budget=args.bwsk_memory_budget if mode == "reversible" else None,
        # The analysis traces the model once; the trace must fit in the model's context.
        bwsk_analysis_seq_len=min(args.bwsk_analysis_seq_len, grid.block_size),
        learning_rate=grid.learning_rates[experiment],
        num_train_epochs=grid.max_epochs,
        # The grid is pushed once, as one repo, at the end; no variant pushes on its own.
        push_to_hub=False,
    )


def train_variant(grid: Grid, experiment: str, mode: str) -> dict:
    """Train, test and publish one variant; return its ``training_results.json`` record.

    A variant a resumed run already finished is read back, not retrained; an interrupted one
    continues from its last checkpoint.
    """
    from transformers import (
        AutoModelForCausalLM,
        EarlyStoppingCallback,
        default_data_collator,
        set_seed,
    )
    from transformers.trainer_utils import get_last_checkpoint

    name = variant_name(experiment, mode)
    if grid.run_dir.finished(name):
        logger.info("%s is finished; skipping it", name)
        return read_record(grid.run_dir.variant(name))
    args = variant_arguments(grid, experiment, mode)
    checkpoints = Path(args.output_dir)
    resume_from = get_last_checkpoint(str(checkpoints)) if grid.resume and checkpoints.is_dir() else None
    set_seed(args.seed)
    if resume_from:
        model = load_model(resume_from)
    elif experiment == "finetune":
        model = load_model(grid.base)
    else:
        model = AutoModelForCausalLM.from_config(grid.config, dtype=torch.float32)
    trainer = BWSKTrainer(
        model=model, args=args, train_dataset=grid.blocks["train"], eval_dataset=grid.blocks["validation"],
        processing_class=grid.tokenizer, data_collator=default_data_collator,
        callbacks=[BWSKCallback(), EarlyStoppingCallback(early_stopping_patience=grid.early_stopping_patience),
                   LogBeforeCheckpoint(),
                   *grid.callbacks],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    load_best_weights(trainer)
    trainer.remove_callback(EarlyStoppingCallback)  # it would warn that the test evaluation has no eval_loss
    test = trainer.evaluate(grid.blocks["test"], metric_key_prefix="test")
    partial = grid.run_dir.partial(name)
    trainer.save_model(str(partial))
    if args.process_index == 0:
        record = read_record(checkpoints)
        record.update(model_slug=grid.slug, experiment=experiment, variant=name,
                      test_loss=test["test_loss"], test_metric=perplexity(test["test_loss"]))
        # Trainer pickles its arguments beside the weights; the record holds them as JSON instead.
        (partial / "training_args.bin").unlink(missing_ok=True)
        write_json(partial / TRAINING_RESULTS, record)
        grid.run_dir.publish(name)
    trainer.accelerator.wait_for_everyone()
    return read_record(grid.run_dir.variant(name))


def read_record(directory: Path) -> dict:
    return json.loads((Path(directory) / TRAINING_RESULTS).read_text(encoding="utf-8"))


def load_model(path: str):
    """A causal LM from a Hub id or directory, in float32 (AMP, when on, casts per op)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_best_weights(trainer) -> None:
    """Put the best checkpoint's weights back through ``from_pretrained``.

    Trainer reloads checkpoints with a raw ``load_state_dict(strict=False)``, but ``save_pretrained``
    writes some parameters under legacy names (transformers 5.23 saves GPT-NeoX's ``lm_head`` as
    ``embed_out``), so the head would silently keep its last-epoch weights. ``from_pretrained`` maps
    the names; for the same reason a resumed variant builds its model from the checkpoint with it.
    """
    checkpoint = trainer.state.best_model_checkpoint
    if not (trainer.args.load_best_model_at_end and checkpoint) or trainer.is_fsdp_enabled:
        return
    trainer.model.load_state_dict(load_model(checkpoint).state_dict())

"""Training one variant of the grid: a ``BWSKTrainer`` run, its test, and its published folder.

Validation every epoch, early stopping on validation loss, the epoch cap, then one test evaluation
on the best checkpoint. Checkpoints go to ``checkpoints/<variant>/``; the variant folder appears
only once complete (see :mod:`hf_bwsk.experiments.run_dir`).
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, PretrainedConfig, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..layout import (
    CALM_REPORT,
    SK_REPORT,
    TRAINING_RESULTS,
    files_under,
    read_json,
    variant_name,
    write_json,
)
from ..training.args import BWSKTrainingArguments
from ..training.callback import BWSKCallback, perplexity
from ..training.trainer import BWSKTrainer
from .run_dir import RunDirectory

# Written into each checkpoint: the variant's training time up to it, for a resumed variant's record.
SESSION_TIME = "bwsk_session_time.json"


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


class CheckpointBookkeeping(TrainerCallback):
    """After every checkpoint: write the variant's training time so far into it, so a resumed variant
    records its time across sessions (the time since the last checkpoint is trained again), and add
    its files to the run's manifest, so overwriting the run deletes them and nothing else."""

    def __init__(self, run_dir: RunDirectory, before: float):
        self.run_dir = run_dir
        self.before = before

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_json(checkpoint / SESSION_TIME, {"wall_time_s": self.before + time.perf_counter() - self._start})
            self.run_dir.record(files_under(checkpoint))


class GridTrainer(BWSKTrainer):
    """``BWSKTrainer`` that leaves loading checkpoint weights to ``from_pretrained``.

    Trainer's own loads (resuming, and the best model at the end) are a raw ``load_state_dict`` that
    misses the head saved under its legacy name and warns ``unexpected keys ['embed_out.weight']``.
    A resumed variant's model is built from its checkpoint by ``from_pretrained`` (which maps the
    names), and :func:`load_best_weights` reloads the best one the same way. FSDP and SageMaker,
    which load into the wrapped model (``model`` given) and which ``load_best_weights`` leaves alone,
    keep Trainer's loads.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is not None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if self.is_fsdp_enabled:
            super()._load_best_model()


def analysis_shape(grid: Grid) -> dict:
    """The shape every variant's trainer traces the analysis at (results.json's analysis uses it too)."""
    return {"seq_len": min(grid.training_args.bwsk_analysis_seq_len, grid.block_size), "batch_size": 1}


def variant_arguments(grid: Grid, experiment: str, mode: str) -> BWSKTrainingArguments:
    """The user's training arguments, specialised for one variant."""
    args = grid.training_args
    return dataclasses.replace(
        args,
        output_dir=str(grid.run_dir.checkpoints / variant_name(experiment, mode)),
        bwsk_mode=mode,
        bwsk_memory_budget=args.bwsk_memory_budget if mode == "reversible" else None,
        bwsk_activation_budget=args.bwsk_activation_budget if mode == "reversible" else None,
        # The analysis traces the model once; the trace must fit in the model's context.
        bwsk_analysis_seq_len=analysis_shape(grid)["seq_len"],
        learning_rate=grid.learning_rates[experiment],
        num_train_epochs=grid.max_epochs,
        # The grid is pushed once, as one repo, at the end; no variant pushes on its own.
        push_to_hub=False,
    )


def train_variant(grid: Grid, experiment: str, mode: str, position: tuple[int, int] = (1, 1)) -> dict:
    """Train, test and publish one variant; return its ``training_results.json`` record.

    A variant a resumed run already finished is read back, not retrained; an interrupted one
    continues from its last checkpoint. A variant whose loss or gradient norm went non-finite
    stopped there (``BWSKCallback``): it is published with its record saying so and no test result.
    """
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    name = variant_name(experiment, mode)
    main_process = grid.training_args.process_index == 0
    if grid.run_dir.finished(name):
        if main_process:
            print(f"[{position[0]}/{position[1]}] {name}: finished in an earlier session, kept", flush=True)
        return read_record(grid.run_dir.variant(name))
    args = variant_arguments(grid, experiment, mode)
    checkpoints = Path(args.output_dir)
    resume_from = get_last_checkpoint(str(checkpoints)) if grid.resume and checkpoints.is_dir() else None
    if main_process:
        print(f"[{position[0]}/{position[1]}] training {name}"
              + (f" (resuming from {Path(resume_from).name})" if resume_from else ""), flush=True)
    set_seed(args.seed)
    before = _time_before(resume_from)
    trainer = _trainer(grid, experiment, args, resume_from, before)
    trainer.train(resume_from_checkpoint=resume_from)
    diverged = trainer.bwsk_callback.diverged
    test = None
    if diverged is None:
        load_best_weights(trainer)
        trainer.remove_callback(EarlyStoppingCallback)  # it would warn that the test evaluation has no eval_loss
        test = trainer.evaluate(grid.blocks["test"], metric_key_prefix="test")
    partial = grid.run_dir.partial(name)
    trainer.save_model(str(partial))
    if main_process:
        record = _final_record(grid, experiment, name, checkpoints, test, before)
        # Trainer pickles its arguments beside the weights; the record holds them as JSON instead.
        (partial / "training_args.bin").unlink(missing_ok=True)
        write_json(partial / TRAINING_RESULTS, record)
        grid.run_dir.record(checkpoints / report for report in (TRAINING_RESULTS, SK_REPORT, CALM_REPORT)
                            if (checkpoints / report).is_file())
        grid.run_dir.publish(name)
    trainer.accelerator.wait_for_everyone()
    return read_record(grid.run_dir.variant(name))


def _time_before(resume_from: str | None) -> float:
    """The variant's training time up to the checkpoint it resumes from (0 for a fresh start)."""
    if not resume_from:
        return 0.0
    what = "this checkpoint predates the session time record; start over with --overwrite_output_dir"
    return read_json(Path(resume_from) / SESSION_TIME, what)["wall_time_s"]


def _trainer(grid: Grid, experiment: str, args: BWSKTrainingArguments, resume_from: str | None,
             before: float) -> "GridTrainer":
    from transformers import AutoModelForCausalLM, default_data_collator

    if resume_from:
        model = load_model(resume_from)
    elif experiment == "finetune":
        model = load_model(grid.base)
    else:
        model = AutoModelForCausalLM.from_config(grid.config, dtype=torch.float32)
    return GridTrainer(
        model=model, args=args, train_dataset=grid.blocks["train"], eval_dataset=grid.blocks["validation"],
        processing_class=grid.tokenizer, data_collator=default_data_collator,
        callbacks=[BWSKCallback(), EarlyStoppingCallback(early_stopping_patience=grid.early_stopping_patience),
                   LogBeforeCheckpoint(), CheckpointBookkeeping(grid.run_dir, before), *grid.callbacks],
    )


def _final_record(grid: Grid, experiment: str, name: str, checkpoints: Path, test: dict | None,
                  before: float) -> dict:
    """The callback's record with the runner's fields: variant, test result, and the time of the
    sessions before this one (the callback measured this session's)."""
    record = read_record(checkpoints)
    record.update(model_slug=grid.slug, experiment=experiment, variant=name,
                  test_loss=None if test is None else test["test_loss"],
                  test_metric=None if test is None else perplexity(test["test_loss"]))
    if record["resumed"]:
        record["wall_time_s"] += before
        record["tokens_per_s"] = None  # the tokens of the sessions before are not known here
    return record


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

"""The experiment runner: 3 BWSK modes x 2 experiments (fine-tune, from scratch) of one model.

``run_grid`` resolves the base model, tokenizer and data, checks everything it can, then trains
each requested variant (:mod:`hf_bwsk.experiments.variant`) into the output directory (layout:
:mod:`hf_bwsk.layout`). The recipes' entry point, which also writes ``results.json``, prints the
tables and pushes, is :mod:`hf_bwsk.recipe`.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from ..errors import BWSKError
from ..training.args import BWSKTrainingArguments
from .args import ExperimentArguments
from .data import (
    SPLITS,
    TinyCorpus,
    load_hub_text,
    load_text_files,
    pack_blocks,
    write_tiny_corpus,
)
from .presets import Preset, TinyBase
from .run_dir import RunDirectory
from .variant import Grid, train_variant


@dataclass(frozen=True)
class GridRun:
    """What a grid run leaves for ``results.json``: the run directory, each variant's record, and the
    provenance (model, analysis, data, hyperparameters) that ``assemble_results`` takes."""

    run_dir: RunDirectory
    runs: list[dict]
    provenance: dict


def run_grid(preset: Preset, args: ExperimentArguments, training_args: BWSKTrainingArguments,
             *, callbacks: tuple = ()) -> GridRun:
    """Train the requested variants of ``preset`` into ``training_args.output_dir``.

    ``callbacks`` are added to every variant's trainer. Every input check happens before training.
    """
    run_dir = _prepare_run_dir(preset, args, training_args)
    with _torch_threads(_given_or(args.torch_threads, preset.torch_threads)):
        return _run_grid(preset, args, training_args, run_dir, callbacks)


@contextmanager
def _torch_threads(count: int | None):
    """Run with ``count`` intra-op threads (None: unchanged), then restore the caller's setting."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_grid(preset, args, training_args, run_dir, callbacks) -> GridRun:
    from transformers import AutoConfig

    block_size = _given_or(args.block_size, preset.block_size)
    corpus = _tiny_corpus_files(preset, args, run_dir, training_args)
    base, tokenizer, make_tiny_base = _base_and_tokenizer(preset, args, run_dir, corpus, block_size)
    blocks, dataset = _experiment_data(preset, args, corpus, tokenizer, block_size, training_args)
    if make_tiny_base is not None:
        base = make_tiny_base(tokenizer, training_args)
    grid = Grid(
        run_dir=run_dir, training_args=training_args, slug=preset.slug, base=base,
        config=AutoConfig.from_pretrained(base), tokenizer=tokenizer, blocks=blocks, block_size=block_size,
        learning_rates={"finetune": training_args.learning_rate,
                        "scratch": _given_or(args.scratch_learning_rate, preset.scratch_learning_rate)},
        max_epochs=_given_or(args.max_epochs, preset.max_epochs),
        early_stopping_patience=args.early_stopping_patience, resume=args.resume, callbacks=tuple(callbacks),
    )
    runs = [train_variant(grid, experiment, mode) for experiment in args.experiments for mode in args.modes]
    return GridRun(run_dir, runs, _provenance(preset, args, grid, dataset))


def _prepare_run_dir(preset, args, training_args) -> RunDirectory:
    run_dir = RunDirectory(training_args.output_dir)
    identity = {"recipe": preset.slug, "preset": preset.name, "seed": training_args.seed}
    run_dir.check(identity, resume=args.resume, overwrite=args.overwrite_output_dir)
    # Every process checks the directory before the main one changes it.
    PartialState().wait_for_everyone()
    with training_args.main_process_first(desc="preparing the output directory"):
        if training_args.process_index == 0:
            run_dir.prepare(identity, overwrite=args.overwrite_output_dir)
    return run_dir


def _base_and_tokenizer(preset, args, run_dir, corpus, block_size):
    """The base model (Hub id or directory), its tokenizer, and for a tiny base not made yet the step
    that makes it (run after the data checks, so bad data fails before any training)."""
    if args.base_model or not isinstance(preset.base, TinyBase):
        base = args.base_model or preset.base
        return base, _hub_tokenizer(base), None
    from . import tiny_base

    directory = run_dir.checkpoints / "tiny-base"
    base_text = Path(corpus["base"]).read_text(encoding="utf-8")
    tokenizer = tiny_base.base_tokenizer(preset.base, base_text, directory, block_size)
    if tiny_base.is_made(directory):
        return str(directory), tokenizer, None

    def make(tokenizer, training_args):
        return str(tiny_base.make_base(preset.base, tokenizer=tokenizer, base_file=corpus["base"],
                                       block_size=block_size, training_args=training_args, directory=directory))

    return None, tokenizer, make


def _hub_tokenizer(base: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise BWSKError(
            f"could not load base model {base!r} from a local directory or the Hugging Face Hub ({first_line}); "
            "--preset tiny works offline, or pass --base_model with a local model directory"
        ) from error


def _tiny_corpus_files(preset, args, run_dir, training_args) -> dict[str, str] | None:
    """The stdlib corpus slices written under ``checkpoints/`` when the base or the data needs them."""
    needs_base = isinstance(preset.base, TinyBase) and not args.base_model
    needs_data = isinstance(preset.data, TinyCorpus) and not args.local_files
    if not (needs_base or needs_data):
        return None
    corpus = preset.data if isinstance(preset.data, TinyCorpus) else TinyCorpus()
    directory = run_dir.checkpoints / "tiny-corpus"
    with training_args.main_process_first(desc="writing the tiny corpus"):
        if training_args.process_index == 0:
            write_tiny_corpus(corpus, directory)
    return {name: str(directory / f"{name}.txt") for name in ("base", *SPLITS)}


def _experiment_data(preset, args, corpus, tokenizer, block_size, training_args):
    """Packed train/validation/test blocks and a description of where the text came from."""
    if args.local_files:
        files = args.local_files
        dataset = {"source": "local", "name": Path(args.train_file).stem, "files": files}
    elif isinstance(preset.data, TinyCorpus):
        files, dataset = {split: corpus[split] for split in SPLITS}, preset.data.describe()
    else:
        files, dataset = None, preset.data.describe()
    with training_args.main_process_first(desc="tokenising the data"):
        raw = load_text_files(files, block_size) if files else load_hub_text(preset.data)
        blocks = pack_blocks(raw, tokenizer, block_size)
    dataset = {**dataset, "block_size": block_size, **{f"{split}_blocks": len(blocks[split]) for split in SPLITS}}
    return blocks, dataset


def _provenance(preset, args, grid, dataset) -> dict:
    """Everything ``results.json`` records beside the runs: model, analysis, device, data, hyperparameters."""
    from transformers import AutoModelForCausalLM

    from ..analysis import analyze
    from ..env import device_description, versions

    training_args = grid.training_args
    with torch.device("meta"):
        params = AutoModelForCausalLM.from_config(grid.config).num_parameters()
    analysis = analyze(grid.config, seq_len=grid.block_size, batch_size=training_args.per_device_train_batch_size)
    tiny_base = isinstance(preset.base, TinyBase) and not args.base_model
    hyperparameters = {
        "finetune_learning_rate": grid.learning_rates["finetune"],
        "scratch_learning_rate": grid.learning_rates["scratch"],
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size,
        "block_size": grid.block_size,
        "max_epochs": grid.max_epochs,
        "early_stopping_patience": grid.early_stopping_patience,
        "optimizer": _plain(training_args.optim),
        "weight_decay": training_args.weight_decay,
        "lr_scheduler_type": _plain(training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "max_grad_norm": training_args.max_grad_norm,
        "fp16": training_args.fp16,
        "bf16": training_args.bf16,
        "base_model": "tiny base, pretrained offline" if tiny_base else grid.base,
    }
    if tiny_base:
        hyperparameters["tiny_base"] = {"vocab_size": preset.base.vocab_size,
                                        "pretrain_epochs": preset.base.pretrain_epochs,
                                        "pretrain_learning_rate": preset.base.pretrain_learning_rate}
    # A --base_model other than the preset's names the model; a local directory has no Hub id.
    model_name = Path(args.base_model).name if args.base_model else preset.model_name
    hf_id = None if Path(grid.base).exists() else grid.base
    return {"model_name": model_name, "hf_id": hf_id, "analysis": analysis, "params": params,
            "seed": training_args.seed, "device": device_description(), "versions": versions(), "dataset": dataset,
            "hyperparameters": hyperparameters}


def _given_or(value, default):
    """A flag's value, or the preset's when the flag was not given (0 is a given value)."""
    return default if value is None else value


def _plain(value):
    """An enum's value (TrainingArguments turns some strings into enums), anything else as is."""
    return getattr(value, "value", value)

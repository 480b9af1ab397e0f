"""The experiment runner: 3 BWSK modes x 2 experiments (fine-tune, from scratch) of one model.

``run_grid`` takes the output directory's lock, resolves the base model, tokenizer and data, checks
everything it can, then trains each requested variant (:mod:`hf_bwsk.experiments.variant`) into the
output directory (layout: :mod:`hf_bwsk.layout`). The recipes' entry point, which also writes
``results.json``, prints the tables and pushes, is :mod:`hf_bwsk.recipe`.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from ..errors import BWSKError
from ..training.args import BWSKTrainingArguments
from .args import ExperimentArguments
from .checks import (
    check_flags,
    check_memory_budget,
    effective_hyperparameters,
    given_or,
    run_identity,
)
from .data import (
    SPLITS,
    TinyCorpus,
    load_hub_text,
    load_text_files,
    pack_blocks,
    text_splits,
    tiny_corpus_slices,
    write_tiny_corpus_texts,
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

    ``callbacks`` are added to every variant's trainer. The output directory's lock is held from the
    start (:func:`lock_output_dir`; a directory another run or push holds is refused first), and every
    input check happens before anything is written: a run refused before training leaves the output
    directory as it was.
    """
    with lock_output_dir(training_args), _torch_threads(given_or(args.torch_threads, preset.torch_threads)):
        return _run_grid(preset, args, training_args, callbacks)


@contextmanager
def lock_output_dir(training_args: BWSKTrainingArguments) -> Iterator[RunDirectory]:
    """Hold ``--output_dir``'s lock until the block ends (:meth:`RunDirectory.lock`; reentrant, so the
    recipe holds it across the grid, ``results.json`` and the push).

    The main process, the one that writes, takes it; when it is refused, every process raises the same
    one-line ``BWSKError`` naming the holder's pid, before any work.
    """
    from accelerate.utils import broadcast_object_list

    run_dir = RunDirectory(training_args.output_dir)
    with ExitStack() as held:
        refusal = None
        if training_args.process_index == 0:
            try:
                held.enter_context(run_dir.lock())
            except BWSKError as error:
                refusal = str(error)
        refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise BWSKError(refusal)
        yield run_dir


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


def _run_grid(preset, args, training_args, callbacks) -> GridRun:
    from transformers import AutoConfig

    check_flags(args, training_args)
    block_size = given_or(args.block_size, preset.block_size)
    hyperparameters = effective_hyperparameters(preset, args, training_args, block_size)
    identity = run_identity(preset, training_args, hyperparameters)
    run_dir = RunDirectory(training_args.output_dir)
    run_dir.check(identity, resume=args.resume, overwrite=args.overwrite_output_dir)
    corpus = _tiny_corpus_texts(preset, args)
    base, tokenizer, make_tiny_base = _base_and_tokenizer(preset, args, run_dir, corpus, block_size)
    blocks, dataset = _experiment_data(preset, args, corpus, tokenizer, block_size, training_args)
    config = AutoConfig.from_pretrained(base) if base else preset.base.make_config(len(tokenizer), block_size)
    check_memory_budget(config, training_args, block_size, args.modes)
    # Everything checked: from here on the run writes.
    _prepare_run_dir(run_dir, identity, args, training_args, corpus)
    if make_tiny_base is not None:
        base = make_tiny_base(tokenizer, training_args)
        config = AutoConfig.from_pretrained(base)
    grid = Grid(
        run_dir=run_dir, training_args=training_args, slug=preset.slug, base=base, config=config,
        tokenizer=tokenizer, blocks=blocks, block_size=block_size,
        learning_rates={"finetune": hyperparameters["finetune_learning_rate"],
                        "scratch": hyperparameters["scratch_learning_rate"]},
        max_epochs=hyperparameters["max_epochs"],
        early_stopping_patience=args.early_stopping_patience, resume=args.resume, callbacks=tuple(callbacks),
    )
    names = [(experiment, mode) for experiment in args.experiments for mode in args.modes]
    runs = [train_variant(grid, experiment, mode, position=(number, len(names)))
            for number, (experiment, mode) in enumerate(names, start=1)]
    return GridRun(run_dir, runs, _provenance(preset, args, grid, dataset, hyperparameters, runs))


def _prepare_run_dir(run_dir, identity, args, training_args, corpus) -> None:
    """Mark the directory ours (overwriting: delete what we wrote before) and write the tiny corpus."""
    # Every process has checked the directory before the main one changes it.
    PartialState().wait_for_everyone()
    with training_args.main_process_first(desc="preparing the output directory"):
        if training_args.process_index == 0:
            run_dir.prepare(identity, overwrite=args.overwrite_output_dir)
            if corpus is not None:
                run_dir.record(write_tiny_corpus_texts(corpus, _corpus_directory(run_dir)).values())


def _corpus_directory(run_dir: RunDirectory) -> Path:
    return run_dir.checkpoints / "tiny-corpus"


def _base_and_tokenizer(preset, args, run_dir, corpus, block_size):
    """The base model (Hub id or directory), its tokenizer, and for a tiny base not made yet the step
    that makes it (run after every check, so bad input fails before any training or writing)."""
    if args.base_model or not isinstance(preset.base, TinyBase):
        base = args.base_model or preset.base
        return base, _hub_tokenizer(base), None
    from . import tiny_base

    directory = run_dir.checkpoints / "tiny-base"
    # Overwriting deletes the base an earlier run made; a resumed run reuses it.
    reuse = tiny_base.is_made(directory) and not args.overwrite_output_dir
    tokenizer = tiny_base.base_tokenizer(preset.base, corpus["base"], directory if reuse else None, block_size)
    if reuse:
        return str(directory), tokenizer, None
    base_file = str(_corpus_directory(run_dir) / "base.txt")

    def make(tokenizer, training_args):
        made, written = tiny_base.make_base(preset.base, tokenizer=tokenizer, base_file=base_file,
                                            block_size=block_size, training_args=training_args, directory=directory)
        if written:
            run_dir.record(written)
        return str(made)

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


def _tiny_corpus_texts(preset, args) -> dict[str, str] | None:
    """The stdlib corpus slices, in memory, when the base or the data needs them (written only
    once every check has passed)."""
    needs_base = isinstance(preset.base, TinyBase) and not args.base_model
    needs_data = isinstance(preset.data, TinyCorpus) and not args.local_files
    if not (needs_base or needs_data):
        return None
    corpus = preset.data if isinstance(preset.data, TinyCorpus) else TinyCorpus()
    return tiny_corpus_slices(corpus.max_chars)


def _experiment_data(preset, args, corpus, tokenizer, block_size, training_args):
    """Packed train/validation/test blocks and a description of where the text came from."""
    with training_args.main_process_first(desc="tokenising the data"):
        if args.local_files:
            raw = load_text_files(args.local_files, block_size)
            dataset = {"source": "local", "name": Path(args.train_file).stem, "files": args.local_files}
        elif isinstance(preset.data, TinyCorpus):
            raw, dataset = text_splits({split: corpus[split] for split in SPLITS}), preset.data.describe()
        else:
            raw, dataset = load_hub_text(preset.data), preset.data.describe()
        blocks = pack_blocks(raw, tokenizer, block_size)
    dataset = {**dataset, "block_size": block_size, **{f"{split}_blocks": len(blocks[split]) for split in SPLITS}}
    return blocks, dataset


def _provenance(preset, args, grid, dataset, hyperparameters, runs) -> dict:
    """Everything ``results.json`` records beside the runs: model, analysis, device, data, hyperparameters."""
    from transformers import AutoModelForCausalLM

    from ..analysis import analyze
    from ..env import device_description, versions
    from ..rng import forked_rng
    from .variant import analysis_shape

    with torch.device("meta"):
        params = AutoModelForCausalLM.from_config(grid.config).num_parameters()
    # The card's S/K figures must be the variants' own: an analysed variant's summary, else the same
    # analysis (a real model, the trainers' shape; a meta-device trace records other aten ops).
    analysis = next((run["analysis"] for run in runs if run.get("analysis")), None)
    if analysis is None:
        with forked_rng(torch.device("cpu")):
            model = AutoModelForCausalLM.from_config(grid.config, dtype=torch.float32)
        analysis = analyze(model, **analysis_shape(grid)).summary()
    # A --base_model other than the preset's names the model; a local directory has no Hub id.
    model_name = Path(args.base_model).name if args.base_model else preset.model_name
    hf_id = None if Path(grid.base).exists() else grid.base
    return {"model_name": model_name, "hf_id": hf_id, "analysis": analysis, "params": params,
            "seed": grid.training_args.seed, "device": device_description(), "versions": versions(),
            "dataset": dataset, "hyperparameters": hyperparameters}

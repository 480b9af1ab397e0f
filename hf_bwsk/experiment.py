"""The experiment runner: 3 BWSK modes x 2 experiments (fine-tune, from scratch) of one model.

A recipe is a dict of presets plus one call::

    from hf_bwsk.experiment import main
    from hf_bwsk.presets import PYTHIA_PRESETS

    if __name__ == "__main__":
        main(PYTHIA_PRESETS)

Flags come from :class:`ExperimentArguments` and :class:`~hf_bwsk.training_args.BWSKTrainingArguments`
(``--help`` lists them all); the chosen preset supplies the defaults of sizes and learning rates.
Each variant is a ``BWSKTrainer`` run with validation every epoch, early stopping on validation loss
and a max-epochs cap, then one test evaluation on the best checkpoint. The output directory layout
is described in :mod:`hf_bwsk.run_dir`; ``results.json`` in ``docs/RESULTS_FORMAT.md``.
"""

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from .data import SPLITS, TinyCorpus, load_hub_text, load_text_files, pack_blocks, write_tiny_corpus
from .errors import BWSKError
from .presets import Preset, TinyBase, get_preset
from .results import assemble_results, format_tables
from .run_dir import EXPERIMENTS, MODE_FOLDERS, MODES, RunDirectory, write_json
from .training_args import BWSKTrainingArguments
from .variant import Grid, train_variant

# TrainingArguments values every preset shares (the published protocol); flags override them.
PROTOCOL_DEFAULTS = {
    "optim": "adamw_torch",
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "steps",
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    # The best and the last checkpoint: enough to test on the best and to resume from the last.
    "save_total_limit": 2,
    # Early stopping's patience counter lives in the checkpoint: a resumed run stops where an
    # uninterrupted one would.
    "restore_callback_states_from_checkpoint": True,
    "report_to": "none",
    # The runner sets each variant's mode; parsing with the most demanding one lets the
    # reversible-only knobs (e.g. --bwsk_memory_budget) be given.
    "bwsk_mode": "reversible",
}


def _split_list(value, valid: tuple[str, ...], flag: str, aliases: dict[str, str] | None = None) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = tuple((aliases or {}).get(item.strip(), item.strip()) for item in items if item.strip())
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        found = ", ".join(unknown) or "empty list"
        raise BWSKError(f"--{flag} {value!r}: unknown {found}; valid values: {', '.join(valid)}")
    return tuple(dict.fromkeys(names))


@dataclass
class ExperimentArguments:
    """What to run: the preset, which variants, where the data comes from, resuming and publishing."""

    preset: str = field(default="tiny", metadata={"help": "Preset: 'full' (the published configuration: Hub model "
                        "and WikiText-2) or 'tiny' (offline, minutes on a CPU)."})
    modes: str = field(default=",".join(MODES), metadata={"help": "Comma-separated BWSK modes to train: "
                       "conventional, analyzed, reversible (folder names bwsk-analyzed/bwsk-reversible also "
                       "accepted). The runner sets each variant's --bwsk_mode itself."})
    experiments: str = field(default=",".join(EXPERIMENTS), metadata={"help": "Comma-separated experiments: "
                             "finetune (from the pretrained base), scratch (same config, random init)."})
    max_epochs: int | None = field(default=None, metadata={"help": "Epoch cap per variant (early stopping on "
                                   "validation loss usually stops sooner); default: the preset's. Sets "
                                   "num_train_epochs."})
    early_stopping_patience: int = field(default=3, metadata={"help": "Evaluations without a better validation "
                                         "loss before a variant stops."})
    scratch_learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate of the "
                                                "from-scratch runs (--learning_rate is the fine-tune one); default: "
                                                "the preset's."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per training sequence (text is packed "
                                   "into blocks of this length); default: the preset's."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id or local directory of the pretrained "
                                   "model to fine-tune (its tokenizer and config serve all variants); default: the "
                                   "preset's (tiny: made offline)."})
    train_file: str | None = field(default=None, metadata={"help": "Local text file to train on instead of the "
                                   "preset's data (needs --validation_file and --test_file)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local text file for validation."})
    test_file: str | None = field(default=None, metadata={"help": "Local text file for the final test."})
    torch_threads: int | None = field(default=None, metadata={"help": "Intra-op CPU threads per process "
                                      "(torch.set_num_threads); default: the preset's (tiny: 1), else torch's."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in --output_dir: skip finished "
                         "variants, resume the interrupted one from its last checkpoint."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over in an --output_dir holding "
                                       "an earlier run (its outputs are removed) or files this runner did not "
                                       "write (they are kept)."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "With --push_to_hub: the Hub repo "
                                    "('namespace/name') the six variants are pushed to, in one commit, at the end."})

    def __post_init__(self):
        self.modes = _split_list(self.modes, MODES, "modes", {folder: mode for mode, folder in MODE_FOLDERS.items()})
        self.experiments = _split_list(self.experiments, EXPERIMENTS, "experiments")
        local = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        if any(local.values()) and not all(local.values()):
            missing = ", ".join(f"--{split}_file" for split, path in local.items() if not path)
            raise BWSKError(
                f"local data needs all three of --train_file, --validation_file, --test_file; add {missing}")
        for name, minimum in (("early_stopping_patience", 1), ("max_epochs", 1), ("block_size", 2),
                              ("torch_threads", 1), ("scratch_learning_rate", 0)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise BWSKError(f"--{name} must be >= {minimum}, got {value}")

    @property
    def local_files(self) -> dict[str, str] | None:
        """Split -> local text file, or None when the preset's data is used."""
        if not self.train_file:
            return None
        return {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}


def parse_arguments(presets: dict[str, Preset], args: list[str] | None = None):
    """``(ExperimentArguments, BWSKTrainingArguments)`` from command-line flags or one YAML/JSON file.

    Defaults come, in increasing priority, from the dataclasses, the runner's protocol, the chosen
    preset, and the user's flags or file.
    """
    from transformers import HfArgumentParser

    args = sys.argv[1:] if args is None else list(args)
    parser = HfArgumentParser((ExperimentArguments, BWSKTrainingArguments))
    if len(args) == 1 and args[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        given = yaml.safe_load(Path(args[0]).read_text(encoding="utf-8")) or {}
        preset = get_preset(presets, given.get("preset", "tiny"))
        return parser.parse_dict({**_defaults(preset), **given})
    known, _ = parser.parse_known_args(args)
    parser.set_defaults(**_defaults(get_preset(presets, known.preset)))
    return parser.parse_args_into_dataclasses(args=args)


def _defaults(preset: Preset) -> dict:
    cuda = torch.cuda.is_available()
    # Launched as several processes without CUDA, TrainingArguments only forms a (gloo) process
    # group when told to use the CPU; otherwise each process trains alone and all of them write.
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # AMP float16 only where it exists: CUDA.
    return {**PROTOCOL_DEFAULTS, "fp16": cuda, "dataloader_pin_memory": cuda,
            "use_cpu": several_processes and not cuda, **preset.training_defaults()}


def main(presets: dict[str, Preset], args: list[str] | None = None) -> dict | None:
    """Parse flags (or a YAML/JSON file), run the grid, print the tables, push if asked.

    A BWSKError is printed as one line and exits with status 2. Returns the results on the main process.
    """
    try:
        experiment_args, training_args = parse_arguments(presets, args)
        preset = get_preset(presets, experiment_args.preset)
        results = run_experiment(preset, experiment_args, training_args)
    except BWSKError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if training_args.process_index == 0:
        print(format_tables(results))
        print(f"Results: {Path(training_args.output_dir) / 'results.json'}")
        return results
    return None


def run_experiment(preset: Preset, args: ExperimentArguments, training_args: BWSKTrainingArguments,
                   *, callbacks: tuple = ()) -> dict:
    """Train the requested variants of ``preset`` and write ``results.json``; return its content.

    ``callbacks`` are added to every variant's trainer. Every input check happens before training.
    """
    if training_args.push_to_hub:
        _check_push(args, training_args)
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


def _run_grid(preset, args, training_args, run_dir, callbacks) -> dict:
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
    results = _results(preset, args, grid, runs, dataset)
    if training_args.process_index == 0:
        write_json(run_dir.results_path, results)
        if training_args.push_to_hub:
            from .hub import push

            push(run_dir.path, args.hub_repo_id, private=bool(training_args.hub_private_repo),
                 revision=training_args.hub_revision, token=training_args.hub_token)
    return results


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


def _check_push(args: ExperimentArguments, training_args: BWSKTrainingArguments) -> None:
    """Refuse a push that would fail after training: no or malformed repo id, missing or rejected token."""
    from .hub import check_repo_id, check_token

    if not args.hub_repo_id:
        raise BWSKError("--push_to_hub needs --hub_repo_id namespace/name (the six variants go to one repo)")
    check_repo_id(args.hub_repo_id)
    check_token(training_args.hub_token)


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


def _results(preset, args, grid, runs, dataset) -> dict:
    from transformers import AutoModelForCausalLM

    from .analysis import analyze
    from .env import device_description, versions

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
    return assemble_results(preset=preset, model_name=model_name, hf_id=hf_id, runs=runs, analysis=analysis,
                            params=params, seed=training_args.seed, device=device_description(), versions=versions(),
                            dataset=dataset, hyperparameters=hyperparameters)


def _given_or(value, default):
    """A flag's value, or the preset's when the flag was not given (0 is a given value)."""
    return default if value is None else value


def _plain(value):
    """An enum's value (TrainingArguments turns some strings into enums), anything else as is."""
    return getattr(value, "value", value)

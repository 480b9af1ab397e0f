"""The runner's flags: `ExperimentArguments` beside `BWSKTrainingArguments`, with the preset's defaults.

Defaults come, in increasing priority, from the dataclasses, the runner's protocol, the chosen
preset, and the user's flags or YAML/JSON file.
"""

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BWSKError
from ..layout import EXPERIMENTS, MODE_FOLDERS, MODES
from ..training.args import BWSKTrainingArguments
from .presets import Preset, get_preset

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


def _names(value, valid: tuple[str, ...], flag: str, aliases: dict[str, str] | None = None) -> list[str]:
    """The names a list flag gives, in order and once each: ``--modes a b``, ``--modes a,b``, both mixed, or
    a YAML list or comma-separated string; aliases mapped to their names. Refuses an unknown or no name."""
    items = [value] if isinstance(value, str) else list(value)
    names = [(aliases or {}).get(name, name) for item in items for name in map(str.strip, str(item).split(",")) if name]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        found = ", ".join(unknown) or "empty list"
        given = " ".join(map(str, items))
        raise BWSKError(f"--{flag} {given!r}: unknown {found}; valid values: {', '.join(valid)}")
    return list(dict.fromkeys(names))


@dataclass
class ExperimentArguments:
    """What to run: the preset, which variants, where the data comes from, resuming and publishing."""

    preset: str = field(default="tiny", metadata={"help": "Preset: 'full' (the published configuration: Hub model "
                        "and WikiText-2) or 'tiny' (offline, minutes on a CPU)."})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "BWSK modes to train, "
                             "space- or comma-separated: conventional, analyzed, reversible (folder names "
                             "bwsk-analyzed/bwsk-reversible also accepted). The runner sets each variant's "
                             "--bwsk_mode itself."})
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS), metadata={"help": "Experiments, "
                                   "space- or comma-separated: finetune (from the pretrained base, at "
                                   "--learning_rate), scratch (same config, random init, at --scratch_learning_rate)."})
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
                                       "an earlier run (the files it wrote, listed in its marker, are deleted) or "
                                       "files this runner did not write (they are kept, wherever they are)."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "With --push_to_hub: the Hub repo "
                                    "('namespace/name') the six variants are pushed to, in one commit, at the end."})

    def __post_init__(self):
        self.modes = _names(self.modes, MODES, "modes", {folder: mode for mode, folder in MODE_FOLDERS.items()})
        self.experiments = _names(self.experiments, EXPERIMENTS, "experiments")
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
    preset, and the user's flags or file. A bad flag or value is a one-line ``BWSKError``.
    """
    from transformers import HfArgumentParser

    class OneLineErrorParser(HfArgumentParser):
        """A usage error as one line naming the fix, not the hundred-line usage block."""

        def error(self, message: str):
            raise BWSKError(f"{message} (see --help)")

    args = sys.argv[1:] if args is None else list(args)
    parser = OneLineErrorParser((ExperimentArguments, BWSKTrainingArguments))
    try:
        if len(args) == 1 and args[0].endswith((".yaml", ".yml", ".json")):
            import yaml

            values = yaml.safe_load(Path(args[0]).read_text(encoding="utf-8")) or {}
            given = set(values)
            _refuse_bwsk_mode(given)
            preset = get_preset(presets, values.get("preset", "tiny"))
            parsed = parser.parse_dict({**_defaults(preset), **values})
        else:
            known, _ = parser.parse_known_args(args)
            given = _given_on_command_line(parser, args, known)
            _refuse_bwsk_mode(given)
            parser.set_defaults(**_defaults(get_preset(presets, known.preset)))
            parsed = parser.parse_args_into_dataclasses(args=args)
    except BWSKError:
        raise
    except ValueError as error:  # TrainingArguments' own checks, e.g. --bf16 on a machine without it
        raise BWSKError(f"{str(error).strip().splitlines()[0]} (check the flags; see --help)") from None
    _refuse_ignored_learning_rate(parsed[0], given)
    return parsed


def _given_on_command_line(parser, args: list[str], parsed) -> set[str]:
    """The fields the command line sets, however spelled (``--learning-rate``, ``--learning_rate=1e-3``,
    an abbreviation), a value equal to its default included."""
    # HfArgumentParser fills in every default before the dataclasses see a value, and comparing a value
    # with its default would miss a flag that repeats the default: argparse itself parses the arguments
    # again, into a namespace whose every field already holds a sentinel (argparse puts a default only
    # where a field is missing), so exactly the given flags replace theirs.
    unset = object()
    seen, _ = parser.parse_known_args(args, namespace=argparse.Namespace(**dict.fromkeys(vars(parsed), unset)))
    return {name for name, value in vars(seen).items() if value is not unset}


def _refuse_bwsk_mode(given: set[str]) -> None:
    """The runner sets each variant's mode from --modes; a --bwsk_mode would be silently ignored."""
    if "bwsk_mode" in given:
        raise BWSKError("--bwsk_mode is set per variant by the runner; choose the modes with --modes "
                        "(e.g. --modes reversible) and drop --bwsk_mode")


def _refuse_ignored_learning_rate(args: ExperimentArguments, given: set[str]) -> None:
    """--learning_rate is the fine-tune variants' rate; without them it would be silently ignored."""
    if "learning_rate" in given and "finetune" not in args.experiments and args.scratch_learning_rate is None:
        raise BWSKError("--learning_rate sets the fine-tune variants' learning rate and --experiments scratch trains "
                        "none; set the from-scratch rate with --scratch_learning_rate and drop --learning_rate")


def _defaults(preset: Preset) -> dict:
    cuda = torch.cuda.is_available()
    # Launched as several processes without CUDA, TrainingArguments only forms a (gloo) process
    # group when told to use the CPU; otherwise each process trains alone and all of them write.
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # AMP float16 only where it exists: CUDA.
    return {**PROTOCOL_DEFAULTS, "fp16": cuda, "dataloader_pin_memory": cuda,
            "use_cpu": several_processes and not cuda, **preset.training_defaults()}

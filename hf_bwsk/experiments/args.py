"""The runner's flags: `ExperimentArguments` beside `BWSKTrainingArguments`, with the preset's defaults.

Defaults come, in increasing priority, from the dataclasses, the runner's protocol, the chosen
preset, and the user's flags or YAML/JSON file.
"""

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
                                       "an earlier run (the files it wrote, listed in its marker, are deleted) or "
                                       "files this runner did not write (they are kept, wherever they are)."})
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

            given = yaml.safe_load(Path(args[0]).read_text(encoding="utf-8")) or {}
            _refuse_bwsk_mode("bwsk_mode" in given)
            preset = get_preset(presets, given.get("preset", "tiny"))
            return parser.parse_dict({**_defaults(preset), **given})
        _refuse_bwsk_mode(any(arg == "--bwsk_mode" or arg.startswith("--bwsk_mode=") for arg in args))
        known, _ = parser.parse_known_args(args)
        parser.set_defaults(**_defaults(get_preset(presets, known.preset)))
        return parser.parse_args_into_dataclasses(args=args)
    except BWSKError:
        raise
    except ValueError as error:  # TrainingArguments' own checks, e.g. --bf16 on a machine without it
        raise BWSKError(f"{str(error).strip().splitlines()[0]} (check the flags; see --help)") from None


def _refuse_bwsk_mode(given: bool) -> None:
    """The runner sets each variant's mode from --modes; a --bwsk_mode would be silently ignored."""
    if given:
        raise BWSKError("--bwsk_mode is set per variant by the runner; choose the modes with --modes "
                        "(e.g. --modes reversible) and drop --bwsk_mode")


def _defaults(preset: Preset) -> dict:
    cuda = torch.cuda.is_available()
    # Launched as several processes without CUDA, TrainingArguments only forms a (gloo) process
    # group when told to use the CPU; otherwise each process trains alone and all of them write.
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # AMP float16 only where it exists: CUDA.
    return {**PROTOCOL_DEFAULTS, "fp16": cuda, "dataloader_pin_memory": cuda,
            "use_cpu": several_processes and not cuda, **preset.training_defaults()}

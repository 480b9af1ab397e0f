"""What a grid run checks before it writes or trains anything: contradicting flags, the precision
the device can run, the reversible mode's memory budget, and the identity a resumed run must match.

Each failure is a one-line ``BWSKError`` naming the fix (the data sizes are checked where the text
is tokenised, :func:`hf_bwsk.experiments.data.pack_blocks`).
"""

import torch

from ..errors import BWSKError
from ..training.args import BWSKTrainingArguments
from .args import ExperimentArguments
from .presets import Preset, TinyBase

# TrainingArguments fields that change what a variant learns or records; a resumed run must keep them.
TRAINING_FIELDS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "optim",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type", "warmup_steps",
    "max_grad_norm", "max_steps", "fp16", "bf16", "logging_steps", "eval_strategy", "eval_steps", "save_strategy",
    "save_steps", "data_seed", "bwsk_loss_chunk_size", "bwsk_memory_budget", "bwsk_activation_budget",
    "bwsk_analysis_seq_len",
)


def effective_hyperparameters(preset: Preset, args: ExperimentArguments, training_args: BWSKTrainingArguments,
                              block_size: int) -> dict:
    """Every setting the variants train with, flags and preset defaults resolved (JSON values)."""
    tiny_base = isinstance(preset.base, TinyBase) and not args.base_model
    found = {
        "finetune_learning_rate": training_args.learning_rate,
        "scratch_learning_rate": given_or(args.scratch_learning_rate, preset.scratch_learning_rate),
        "block_size": block_size,
        "max_epochs": given_or(args.max_epochs, preset.max_epochs),
        "early_stopping_patience": args.early_stopping_patience,
        "world_size": training_args.world_size,
        "base_model": "tiny base, pretrained offline" if tiny_base else (args.base_model or preset.base),
        "data_files": args.local_files,
        **{name: _plain(getattr(training_args, name)) for name in TRAINING_FIELDS},
    }
    if tiny_base:
        found["tiny_base"] = {"vocab_size": preset.base.vocab_size, "pretrain_epochs": preset.base.pretrain_epochs,
                              "pretrain_learning_rate": preset.base.pretrain_learning_rate}
    return found


def run_identity(preset: Preset, training_args: BWSKTrainingArguments, hyperparameters: dict) -> dict:
    """What the marker records and ``--resume`` compares: recipe, preset, seed and every hyperparameter."""
    return {"recipe": preset.slug, "preset": preset.name, "seed": training_args.seed, **hyperparameters}


def check_flags(args: ExperimentArguments, training_args: BWSKTrainingArguments) -> None:
    """Refuse flags that contradict each other or the device (precision)."""
    for flag in ("bwsk_memory_budget", "bwsk_activation_budget"):
        if getattr(training_args, flag) is not None and "reversible" not in args.modes:
            raise BWSKError(f"--{flag} applies to the reversible mode, which --modes "
                            f"{' '.join(args.modes)} leaves out; add reversible to --modes or drop the budget")
    check_precision(training_args)


def check_precision(training_args: BWSKTrainingArguments) -> None:
    """AMP float16 runs only on CUDA here; asking for it elsewhere would train in fp32 and say fp16."""
    if training_args.fp16 and not torch.cuda.is_available():
        raise BWSKError("--fp16 needs a CUDA GPU and this machine has none (the run would train in fp32); "
                        "drop --fp16, or pass --bf16 true --use_cpu true for bfloat16 AMP on the CPU")


def check_memory_budget(config, training_args: BWSKTrainingArguments, block_size: int, modes: list[str]) -> None:
    """Refuse a ``--bwsk_memory_budget`` or ``--bwsk_activation_budget`` the reversible variants cannot meet,
    before any training.

    Two floors, measured on the meta device at the run's shape with the mechanism the reversible mode
    uses at its first step (`memory.layer_trace` and `memory.budget`): the decoder-layer inputs of one
    batch (kept even when everything is recomputed), then, for a peak budget, the whole-step peak of
    full recomputation (weights, gradients and optimizer state included).
    """
    budget = training_args.bwsk_memory_budget_bytes
    activations = training_args.bwsk_activation_budget_bytes
    if (budget is None and activations is None) or "reversible" not in modes:
        return
    from transformers import AutoModelForCausalLM, Trainer

    from ..analysis import find_decoder_layers
    from ..memory.budget import kept_bytes_budget, step_shape, training_state_bytes
    from ..memory.layer_trace import trace_layers
    from ..memory.loss import auto_chunk_size

    batch_size = training_args.per_device_train_batch_size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    input_ids = torch.zeros(batch_size, block_size, dtype=torch.long, device="meta")
    layers_path, layers = find_decoder_layers(model)
    trace = trace_layers(model, layers_path, layers, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    minimum = sum(trace.layer_input_bytes) * trace.batch_size
    flag, given = ("bwsk_memory_budget", budget) if budget is not None else ("bwsk_activation_budget", activations)
    if given < minimum:
        raise BWSKError(
            f"--{flag} {given:,} bytes is below the minimum {minimum:,} bytes (the decoder-layer "
            f"inputs of a batch of {batch_size} x {block_size}, kept even when everything is recomputed): "
            "raise it to at least that"
        )
    if budget is None:
        return
    head_weight = model.get_output_embeddings().weight
    chunk = training_args.bwsk_loss_chunk_size or auto_chunk_size(input_ids.numel(), *head_weight.shape[::-1])
    # The optimizer the Trainer will build (its default, adamw_torch_fused, has no step temporaries).
    _, optimizer_options = Trainer.get_optimizer_cls_and_kwargs(training_args)
    state = training_state_bytes(model, optimizer_options=optimizer_options, device_type=training_args.device.type)
    kept_bytes_budget(budget, step_shape(trace, state, head_weight, chunk), minimum)


def given_or(value, default):
    """A flag's value, or the preset's when the flag was not given (0 is a given value)."""
    return default if value is None else value


def _plain(value):
    """An enum's value (TrainingArguments turns some strings into enums), anything else as is."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

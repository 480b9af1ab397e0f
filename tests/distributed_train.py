"""Launched as 2 processes by tests/test_distributed.py: conventional then reversible under the same launch.

Usage: accelerate launch --config_file <config> tests/distributed_train.py RESULT.json ARCH STEPS [OPTION=VALUE ...]

Writes, from rank 0, per mode: the per-step losses, the wrapper the Trainer trained through, the
reversible status, and (DDP) the all-reduced gradients of the first step's optimizer step. OPTION=VALUE
pairs go to `BWSKTrainingArguments` (as strings; e.g. gradient_accumulation_steps=2).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from process_group import leave_process_group  # noqa: E402
from tiny_models import tiny_batch, tiny_model  # noqa: E402

from hf_bwsk.training.args import BWSKTrainingArguments  # noqa: E402
from hf_bwsk.training.trainer import BWSKTrainer  # noqa: E402


class FirstStepGradients(TrainerCallback):
    """The gradients the optimizer receives on the first step (after DDP's all-reduce)."""

    def __init__(self):
        self.model = None
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradients is None and self.model is not None:
            self.gradients = {
                name: param.grad.detach().clone().tolist()
                for name, param in self.model.named_parameters()
                if param.grad is not None and not hasattr(param.grad, "full_tensor")  # FSDP2 shards: skip
            }


def train(mode: str, arch: str, steps: int, options: dict) -> dict:
    # The same 4 samples every step (2 ranks x 2): the loss must fall.
    dataset = [{key: value[0] for key, value in tiny_batch(1, 16, seed=i % 4).items()} for i in range(4 * steps)]
    args = BWSKTrainingArguments(
        output_dir=tempfile.mkdtemp(), bwsk_mode=mode, bwsk_loss_chunk_size=20, bwsk_analysis_seq_len=8,
        max_steps=steps, per_device_train_batch_size=2, logging_steps=1, learning_rate=3e-3, seed=0,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **options,
    )
    gradients = FirstStepGradients()
    trainer = BWSKTrainer(model=tiny_model(arch), args=args, train_dataset=dataset, callbacks=[gradients])
    gradients.model = trainer.model
    trainer.train()
    status = trainer.reversible_mode.status() if trainer.reversible_mode is not None else None
    return {
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "wrapper": type(trainer.model_wrapped).__name__,
        "status": status,
        "gradients": gradients.gradients,
        "world_size": trainer.args.world_size,
        "is_main": trainer.is_world_process_zero(),
    }


def main():
    result_path, arch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    options = dict(pair.split("=", 1) for pair in sys.argv[4:])
    options = {key: int(value) if value.isdigit() else value for key, value in options.items()}
    torch.set_num_threads(1)
    results = {mode: train(mode, arch, steps, options) for mode in ("conventional", "reversible")}
    if results["reversible"]["is_main"]:
        Path(result_path).write_text(json.dumps(results, default=str), encoding="utf-8")

    leave_process_group()


if __name__ == "__main__":
    main()

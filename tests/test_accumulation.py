"""Gradient accumulation: the reversible mode's gradients equal conventional training's, masked labels included."""

import tempfile

import pytest
import torch
from distributed_train import FirstStepGradients
from grad_compare import assert_tensors_close
from tiny_models import tiny_batch, tiny_model

from hf_bwsk.training.args import BWSKTrainingArguments
from hf_bwsk.training.trainer import BWSKTrainer


def masked_dataset(count=8, seq_len=16):
    """Samples whose labels are partly ignored (-100), by different amounts: the token counts differ per micro-batch."""
    samples = []
    for i in range(count):
        sample = {key: value[0] for key, value in tiny_batch(1, seq_len, seed=i).items()}
        sample["labels"][seq_len - 2 * (i % 4):] = -100
        samples.append(sample)
    return samples


def first_step(mode: str, arch: str, accumulation: int) -> tuple[dict, list[float]]:
    args = BWSKTrainingArguments(
        output_dir=tempfile.mkdtemp(), bwsk_mode=mode, bwsk_loss_chunk_size=7, bwsk_analysis_seq_len=8,
        max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=accumulation, logging_steps=1,
        learning_rate=3e-3, seed=0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    gradients = FirstStepGradients()
    trainer = BWSKTrainer(model=tiny_model(arch), args=args, train_dataset=masked_dataset(), callbacks=[gradients])
    gradients.model = trainer.model
    trainer.train()
    return gradients.gradients, [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("arch", ["gpt_neox", pytest.param("llama", marks=pytest.mark.slow)])
def test_accumulated_gradients_with_masked_labels_equal_conventional(arch):
    expected, expected_losses = first_step("conventional", arch, accumulation=4)
    actual, losses = first_step("reversible", arch, accumulation=4)
    assert expected, "no gradients captured"
    assert_tensors_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6, name="losses")
    for name, gradient in expected.items():
        assert_tensors_close(torch.tensor(actual[name]), torch.tensor(gradient), rtol=1e-5, atol=1e-6,
                             name=f"accumulated gradient of {name}")

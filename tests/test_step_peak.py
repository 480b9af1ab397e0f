"""The whole-step peak tracker against peaks computed by hand, and its split into state and activations."""

import pytest
import torch

from hf_bwsk.memory import step_peak
from tests.tiny_models import tiny_batch, tiny_model

KB = 1024  # bytes of 256 fp32 values


def _sgd_step(weight, optimizer):
    def step():
        doubled = torch.ones(256) * 2  # ones (1 KB) freed after the multiply (1 KB) returns
        loss = (weight * doubled).sum()  # product 1 KB, freed inside sum; loss 4 B
        loss.backward()  # grad_output 4 B; grad = grad_output * doubled, 1 KB
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def test_peak_of_a_hand_counted_step():
    weight = torch.nn.Parameter(torch.ones(256))
    model = torch.nn.Module()
    model.weight = weight
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    first = step_peak(_sgd_step(weight, optimizer), model=model, optimizer=optimizer)
    # First step: the peak is SGD cloning the 1 KB grad into its new momentum buffer, while the locals
    # `doubled` (1 KB) and `loss` (4 B) are alive: weight + grad + momentum + doubled + loss.
    assert first.peak_bytes == 4 * KB + 4, first
    assert (first.weight_bytes, first.grad_bytes, first.optimizer_bytes) == (KB, KB, KB), first
    assert first.activation_bytes == KB + 4 and first.phase == "after_backward", first
    second = step_peak(_sgd_step(weight, optimizer), model=model, optimizer=optimizer)
    # Second step: the momentum exists from the start; the peak is the grad's multiply in backward:
    # weight + momentum + doubled + grad + loss + grad_output.
    assert second.peak_bytes == 4 * KB + 8, second
    assert (second.weight_bytes, second.grad_bytes, second.optimizer_bytes) == (KB, KB, KB), second
    assert second.phase == "backward" and second.peak_op == "aten.mul.Tensor", second
    assert second.state_bytes == 3 * KB, second


def test_peak_counts_state_untouched_by_any_op():
    weight = torch.nn.Parameter(torch.ones(256))
    idle = torch.nn.Parameter(torch.ones(1024))  # never used: still resident for the whole step
    model = torch.nn.Module()
    model.weight, model.idle = weight, idle
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    peak = step_peak(_sgd_step(weight, optimizer), model=model, optimizer=optimizer)
    assert peak.peak_bytes == 8 * KB + 4, peak
    assert peak.weight_bytes == 5 * KB, peak


@pytest.mark.parametrize("arch", ["gpt_neox", "mamba"])
def test_tiny_model_step_peak_sits_between_the_floor_and_floor_plus_everything(arch):
    model = tiny_model(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tiny_batch(2, 32)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_peak(step, model=model, optimizer=optimizer)  # the first step creates the AdamW moments
    peak = step_peak(step, model=model, optimizer=optimizer)
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * 4 for b in model.buffers())
    step_counters = sum(4 for state in optimizer.state.values())  # AdamW's 0-dim fp32 `step` per parameter
    # weights and buffers, grads, two moments, all fp32
    assert peak.state_bytes == 4 * params + buffers + step_counters, peak
    assert peak.weight_bytes == params + buffers and peak.optimizer_bytes == 2 * params + step_counters, peak
    assert peak.activation_bytes > 0 and peak.peak_bytes > peak.state_bytes, peak
    assert peak.peak_bytes == peak.weight_bytes + peak.grad_bytes + peak.optimizer_bytes + peak.activation_bytes

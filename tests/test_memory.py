"""Deterministic bytes kept for backward and FLOP counts."""

import functools

import pytest
import torch
from tiny_models import tiny_batch, tiny_model
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from hf_bwsk.memory.checkpointing import enable_checkpointing
from hf_bwsk.memory.loss import fused_linear_cross_entropy
from hf_bwsk.memory.measure import (
    LiveStorageTracker,
    bytes_kept_for_backward,
    count_train_flops,
)

FP32 = 4


def mlp_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=generator, requires_grad=True)
    w_up = torch.randn(64, 16, generator=generator, requires_grad=True)
    w_down = torch.randn(16, 64, generator=generator, requires_grad=True)
    return x, w_up, w_down


def test_counts_exactly_what_autograd_keeps():
    x, w_up, _ = mlp_inputs()
    # mm saves its inputs (pre-existing, not counted); relu saves its output; the mm output dies.
    measured = bytes_kept_for_backward(lambda: (x @ w_up.t()).relu().sum())
    assert measured.activation_bytes == 8 * 64 * FP32 + FP32  # relu output + the loss itself
    assert measured.grad_buffer_bytes == 0
    assert measured.to_dict()["total_bytes"] == measured.activation_bytes


def test_selective_checkpointing_cache_is_counted():
    x, w_up, w_down = mlp_inputs()

    def block(inputs):
        return torch.nn.functional.gelu(inputs @ w_up.t()) @ w_down.t()

    def forward(policy):
        context = functools.partial(create_selective_checkpoint_contexts, lambda *args, **kwargs: policy)
        return lambda: checkpoint(block, x, use_reentrant=False, context_fn=context).sum()

    saved = bytes_kept_for_backward(forward(CheckpointPolicy.MUST_SAVE))
    recomputed = bytes_kept_for_backward(forward(CheckpointPolicy.PREFER_RECOMPUTE))
    # The cache holds both mm outputs and the gelu output; saved_tensors_hooks sees none of them.
    assert saved.activation_bytes == (8 * 64 + 8 * 64 + 8 * 16) * FP32 + FP32
    assert recomputed.activation_bytes == FP32


def test_deterministic_and_activation_checkpointing_keeps_less():
    model = tiny_model("gpt_neox").train()
    batch = tiny_batch(batch_size=2, seq_len=64)
    first = bytes_kept_for_backward(lambda: model(**batch).loss)
    second = bytes_kept_for_backward(lambda: model(**batch).loss)
    assert first == second
    enable_checkpointing(model, {"use_reentrant": False})  # the name this transformers has
    checkpointed = bytes_kept_for_backward(lambda: model(**batch).loss)
    assert checkpointed.activation_bytes < 0.5 * first.activation_bytes, (checkpointed, first)


def test_context_manager_form_matches_function_form():
    model = tiny_model("llama").train()
    batch = tiny_batch(batch_size=2, seq_len=32)
    expected = bytes_kept_for_backward(lambda: model(**batch).loss)
    tracker = LiveStorageTracker().start()
    loss = model(**batch).loss
    tracker.stop()
    assert tracker.live_bytes() == expected
    loss.backward()
    del loss
    assert tracker.live_bytes().activation_bytes == 0


def fused_forward(model, batch):
    hidden = model.base_model(input_ids=batch["input_ids"]).last_hidden_state
    return fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["labels"], chunk_size=32)


def test_fused_loss_keeps_far_less_and_reports_its_weight_grad_apart():
    vocab, hidden_size = 8192, 32
    model = tiny_model("gpt_neox", vocab_size=vocab).train()
    batch = tiny_batch(batch_size=2, seq_len=32)
    stock = bytes_kept_for_backward(lambda: model(**batch).loss)
    fused = bytes_kept_for_backward(lambda: fused_forward(model, batch))
    assert stock.grad_buffer_bytes == 0
    assert fused.grad_buffer_bytes == vocab * hidden_size * FP32
    assert fused.activation_bytes < 0.2 * stock.activation_bytes, (fused, stock)


def test_flops_count_forward_and_backward():
    x, w_up, _ = mlp_inputs()
    flops = count_train_flops(lambda: (x @ w_up.t()).sum().backward())
    # forward mm, then grads of x and of w_up: three 8 x 16 x 64 matmuls.
    assert flops == 3 * 2 * 8 * 16 * 64


def test_flops_see_recompute_and_the_fused_loss_skips_only_ignored_positions():
    vocab, hidden_size, batch_size, seq_len = 512, 32, 2, 32
    model = tiny_model("gpt_neox", vocab_size=vocab).train()
    batch = tiny_batch(batch_size=batch_size, seq_len=seq_len)
    stock = count_train_flops(lambda: model(**batch).loss.backward())
    fused = count_train_flops(lambda: fused_forward(model, batch).backward())
    # The head costs 3 matmuls per token; the fused loss skips the last position of each sequence.
    assert stock - fused == 3 * 2 * batch_size * hidden_size * vocab
    enable_checkpointing(model, {"use_reentrant": False})  # the name this transformers has
    assert count_train_flops(lambda: model(**batch).loss.backward()) > stock


@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])  # untied and tied head
def test_everything_is_released_after_backward(arch):
    model = tiny_model(arch).train()
    batch = tiny_batch(batch_size=2, seq_len=16)
    with LiveStorageTracker() as tracker:
        loss = fused_forward(model, batch)
    assert tracker.live_bytes(loss).grad_buffer_bytes > 0
    loss.backward()
    del loss
    after = tracker.live_bytes()
    # At most the head's weight gradient survives: adopted as `.grad`, no longer a buffer for backward.
    assert after.grad_buffer_bytes == 0
    assert after.activation_bytes <= model.get_output_embeddings().weight.grad.untyped_storage().nbytes()

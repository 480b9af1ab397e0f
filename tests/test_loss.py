"""fused_linear_cross_entropy against HF's own causal-LM loss: values and gradients."""

import pytest
import torch
from grad_compare import assert_grads_close, assert_tensors_close
from tiny_models import ARCHS, VOCAB, tiny_batch, tiny_model
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_bwsk.errors import BWSKError
from hf_bwsk.memory.loss import fused_linear_cross_entropy, head_grad_buffers

RTOL, ATOL = 1e-5, 1e-6


def padded_batch(seed=0):
    """Right padding on one row and an ignored label mid-sequence on the other."""
    batch = tiny_batch(batch_size=2, seq_len=16, seed=seed)
    batch["attention_mask"][1, 12:] = 0
    batch["labels"][1, 12:] = -100
    batch["labels"][0, 5] = -100
    return batch


def stock_loss(model, batch, num_items_in_batch=None):
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**batch, **kwargs).loss


def fused_loss(model, batch, chunk_size, num_items_in_batch=None):
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return fused_linear_cross_entropy(
        hidden, model.get_output_embeddings().weight, batch["labels"],
        num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
    )


def model_pair(arch):
    return tiny_model(arch, seed=0).eval(), tiny_model(arch, seed=0).eval()


def synthetic(seed=0, shape=(2, 9, 8), vocab=40, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, shape[-1], generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=generator, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, shape[:-1], generator=generator)
    labels[0, 2] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_every_gradient_match_stock_loss(arch):
    stock_model, fused_model = model_pair(arch)
    batch = padded_batch()
    expected = stock_loss(stock_model, batch)
    expected.backward()
    # 2 x 16 tokens, 26 of them with a target: 7 divides neither.
    actual = fused_loss(fused_model, batch, chunk_size=7)
    actual.backward()
    assert_tensors_close(actual, expected, RTOL, ATOL, name=f"{arch} loss")
    assert_grads_close(fused_model, stock_model, RTOL, ATOL)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_gradient_accumulation_with_num_items_in_batch(arch):
    stock_model, fused_model = model_pair(arch)
    micro_batches = [padded_batch(seed=0), padded_batch(seed=1)]
    num_items = sum((b["labels"][..., 1:] != -100).sum() for b in micro_batches)
    expected, actual = [], []
    for batch in micro_batches:
        loss = stock_loss(stock_model, batch, num_items_in_batch=num_items)
        loss.backward()
        expected.append(loss.detach())
        loss = fused_loss(fused_model, batch, chunk_size=5, num_items_in_batch=num_items)
        loss.backward()
        actual.append(loss.detach())
    assert_tensors_close(torch.stack(actual), torch.stack(expected), RTOL, ATOL, name="micro-batch losses")
    assert_grads_close(fused_model, stock_model, RTOL, ATOL)


@pytest.mark.parametrize("num_items", [None, 7, torch.tensor(7)])
def test_bias_and_chunking_match_hf_loss_function(num_items):
    hidden, weight, bias, labels = synthetic()
    expected = ForCausalLMLoss(
        torch.nn.functional.linear(hidden, weight, bias), labels, vocab_size=weight.shape[0],
        num_items_in_batch=num_items,
    )
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    for chunk_size in (1, 4, 1024):
        actual = fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, chunk_size=chunk_size, num_items_in_batch=num_items
        )
        actual_grads = torch.autograd.grad(actual, (hidden, weight, bias))
        assert_tensors_close(actual, expected, RTOL, ATOL, name=f"loss, chunk {chunk_size}")
        for name, a, e in zip(("hidden", "weight", "bias"), actual_grads, expected_grads):
            assert_tensors_close(a, e, RTOL, ATOL, name=f"grad {name}, chunk {chunk_size}")


def test_non_contiguous_hidden_states_and_shift_labels():
    hidden, weight, _, labels = synthetic()
    # A [seq, batch, hidden] tensor seen as [batch, seq, hidden]: not contiguous.
    seq_first = hidden.detach().transpose(0, 1).contiguous().requires_grad_()
    strided = seq_first.transpose(0, 1)
    assert not strided.is_contiguous()
    expected = ForCausalLMLoss(strided @ weight.t(), labels, vocab_size=weight.shape[0])
    expected_grad = torch.autograd.grad(expected, seq_first)[0]
    actual = fused_linear_cross_entropy(strided, weight, labels, chunk_size=3)
    assert_tensors_close(actual, expected, RTOL, ATOL, name="loss")
    assert_tensors_close(torch.autograd.grad(actual, seq_first)[0], expected_grad, RTOL, ATOL, name="grad")
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    via_shift_labels = fused_linear_cross_entropy(strided, weight, None, shift_labels=shifted)
    assert_tensors_close(via_shift_labels, expected, RTOL, ATOL, name="loss from shift_labels")


def test_all_tokens_ignored_matches_hf_nan_and_zero_grads():
    hidden, weight, _, labels = synthetic()
    labels = torch.full_like(labels, -100)
    expected = ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=weight.shape[0])
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    actual = fused_linear_cross_entropy(hidden, weight, labels)
    actual_grads = torch.autograd.grad(actual, (hidden, weight))
    assert torch.isnan(expected) and torch.isnan(actual)
    for a, e in zip(actual_grads, expected_grads):
        assert_tensors_close(a, e, 0, 0, name="grad with every token ignored")


def test_upstream_gradient_scales_the_stored_gradients():
    hidden, weight, bias, labels = synthetic()
    expected = 2.5 * ForCausalLMLoss(hidden @ weight.t() + bias, labels, vocab_size=weight.shape[0])
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    actual = 2.5 * fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=4)
    for name, a, e in zip(("hidden", "weight", "bias"), torch.autograd.grad(actual, (hidden, weight, bias)),
                          expected_grads):
        assert_tensors_close(a, e, RTOL, ATOL, name=f"grad {name}")


def test_weight_gradient_is_adopted_as_grad_without_copy_and_backward_runs_once():
    hidden, weight, _, labels = synthetic()
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    (buffer_pointer,) = [b.data_ptr() for b in head_grad_buffers(loss) if b.shape == weight.shape]
    loss.backward()
    assert weight.grad.data_ptr() == buffer_pointer
    assert not any(b.data_ptr() == buffer_pointer for b in head_grad_buffers(loss))
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_without_grad_only_the_loss_is_computed():
    hidden, weight, _, labels = synthetic()
    expected = ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=weight.shape[0])
    with torch.no_grad():
        actual = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert actual.grad_fn is None
    assert head_grad_buffers(actual) == []
    assert_tensors_close(actual, expected, RTOL, ATOL, name="no-grad loss")


def test_bf16_autocast_close_to_stock_loss():
    stock_model, fused_model = model_pair("llama")
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock_loss(stock_model, batch)
        actual = fused_loss(fused_model, batch, chunk_size=7)
    expected.backward()
    actual.backward()
    assert actual.dtype == torch.float32
    assert fused_model.get_output_embeddings().weight.grad.dtype == torch.float32
    assert_tensors_close(actual, expected, 1e-2, 1e-2, name="bf16 autocast loss")
    assert_grads_close(fused_model, stock_model, rtol=5e-2, atol=5e-3)


def test_bf16_weights_give_bf16_grads():
    hidden, weight, _, labels = synthetic(dtype=torch.bfloat16)
    expected = ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=weight.shape[0])
    actual = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    grads = torch.autograd.grad(actual, (hidden, weight))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    assert_tensors_close(actual, expected, 1e-2, 1e-2, name="bf16 loss")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"weight": torch.zeros(VOCAB, 5)}, "get_output_embeddings"),
        ({"labels": torch.zeros(2, 3, dtype=torch.long)}, "labels"),
    ],
)
def test_bad_input_names_the_fix(kwargs, message):
    hidden, weight, _, labels = synthetic()
    arguments = {"hidden_states": hidden, "weight": weight, "labels": labels, **kwargs}
    with pytest.raises(BWSKError, match=message):
        fused_linear_cross_entropy(**arguments)


def test_fp16_gradients_of_a_large_batch_do_not_underflow():
    # A large token count (as num_items_in_batch) makes softmax / count underflow fp16 if divided first;
    # HF's fp16 path without loss scaling is off by ~3% here.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 32, 16, generator=generator, dtype=torch.float64)
    weight = 0.5 * torch.randn(1000, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 1000, (2, 32), generator=generator)

    def grads(dtype, loss_fn):
        inputs = (hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_())
        return [g.double() for g in torch.autograd.grad(loss_fn(*inputs), inputs)]

    reference = grads(torch.float64, lambda h, w: ForCausalLMLoss(h @ w.t(), labels, 1000, num_items_in_batch=2**16))
    fused = grads(torch.float16, lambda h, w: fused_linear_cross_entropy(h, w, labels, num_items_in_batch=2**16))
    for name, actual, expected in zip(("hidden", "weight"), fused, reference):
        relative_error = ((actual - expected).norm() / expected.norm()).item()
        assert relative_error < 1e-2, f"fp16 grad of {name}: relative error {relative_error:.3g}"

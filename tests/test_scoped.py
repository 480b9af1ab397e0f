"""Scoped execution of the recompute plan: the plan executed (same bytes, same FLOPs as per-op), exact gradients."""

import dataclasses

import pytest
import torch
from grad_compare import assert_grads_close, assert_tensors_close
from tiny_models import ARCHS, tiny_batch, tiny_config, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_bwsk.analysis import find_decoder_layers
from hf_bwsk.errors import BWSKError
from hf_bwsk.memory import (
    ReversibleMode,
    bytes_kept_for_backward,
    count_train_flops,
    kernel_call,
    scoped,
)
from hf_bwsk.memory.plan import OpKey, RecomputePlan
from hf_bwsk.memory.scoped import _linear_layout, scopes_of

ARCH_PARAMS = [pytest.param(arch, marks=pytest.mark.slow) if arch == "mamba" else arch for arch in ARCHS]
# Architectures with attention, and those whose sdpa attention runs one attention kernel (GPT-2's, in
# training with dropout, decomposes into matmuls on CPU: its attention module stays a module scope).
SDPA_ARCHS = ["gpt2", "gpt_neox", "llama", "opt"]
KERNEL_ARCHS = ["gpt_neox", "llama", "opt"]


def sdpa_model(arch, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")


def reversible(model, batch, execution="auto"):
    mode = ReversibleMode(model, find_layers=find_decoder_layers, loss_chunk_size=24, execution=execution)
    mode.install_forward()
    mode.setup(batch)
    return mode


def kept_and_flops(model, batch, execution):
    model.train()
    mode = reversible(model, batch, execution)
    assert mode.status()["execution"] == execution
    kept = bytes_kept_for_backward(lambda: model(**batch).loss).activation_bytes
    model.zero_grad()
    torch.manual_seed(5)  # GPT-2's dropout: the same masks on both sides
    flops = count_train_flops(lambda: model(**batch).loss.backward())
    mode.teardown()
    return kept, flops, mode.plan.skipped_bytes, {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_scoped_keeps_less_by_the_skipped_bytes_recomputes_the_same_flops_and_gives_per_op_gradients(arch, attention):
    if attention == "sdpa" and arch not in SDPA_ARCHS:
        pytest.skip("no attention")
    build = sdpa_model if attention == "sdpa" else tiny_model
    batch = tiny_batch(2, 64, seed=1)
    kept, flops, skipped, grads = kept_and_flops(build(arch), batch, "scoped")
    kept_per_op, flops_per_op, skipped_per_op, grads_per_op = kept_and_flops(build(arch), batch, "per_op")
    # Per-op execution cannot skip: it keeps what scoped execution skips (neither kept nor recomputed).
    # GPT-2 and OPT train with dropout between their last projection and the residual: nothing to skip.
    assert skipped_per_op == 0 and (skipped > 0) == (arch not in ("gpt2", "opt")), (arch, skipped, skipped_per_op)
    assert (kept, flops) == (kept_per_op - skipped, flops_per_op), (
        f"{arch}/{attention}: scoped (bytes, FLOPs) {(kept, flops)} != per-op {(kept_per_op, flops_per_op)} "
        f"less the {skipped} skipped bytes")
    # Kept linears' recompute saves what F.linear saved in the forward, whose own backward then runs: bit for bit.
    differ = [name for name in grads if not torch.equal(grads[name], grads_per_op[name])]
    assert not differ, f"gradients differ from per-op's: {differ}"


@pytest.mark.parametrize("arch", KERNEL_ARCHS)
def test_sdpa_attention_is_scoped_to_the_attention_call_with_exact_gradients(arch):
    conventional, model = sdpa_model(arch), sdpa_model(arch)
    conventional.train()
    model.train()
    batch = tiny_batch(2, 40, seed=3)
    batch["attention_mask"][1, -5:] = 0
    batch["labels"][1, -5:] = -100
    mode = reversible(model, batch)
    scopes = mode.policy.scopes
    assert mode.status()["execution"] == "scoped" and all(scopes.attention.values()), scopes
    mode.policy.decisions = {}
    for m in (conventional, model):
        m.zero_grad()
    torch.manual_seed(7)
    expected = conventional(**batch).loss
    expected.backward()
    torch.manual_seed(7)
    loss = model(**batch).loss
    loss.backward()
    assert_tensors_close(loss, expected, rtol=1e-5, atol=1e-6, name=f"{arch} loss")
    assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    # The attention kernels were decided as planned (kept), inside the attention call only.
    kept_attention = {key for key in mode.plan.keep if key.path in scopes.attention[key.layer]}
    assert kept_attention and all(mode.policy.decisions.get(key) is True for key in kept_attention)
    assert mode.status()["plan_fidelity"]["plan_misses"] == 0
    mode.teardown()


class _AttentionKernels(TorchDispatchMode):
    """Counts the forward attention kernels that run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.count += "scaled_dot_product" in name and "backward" not in name
        return func(*args, **(kwargs or {}))


def _grads_and_recomputed_kernels(arch, batch, monkeypatch):
    """Gradients, attention kernels run in backward, and attention kernels the dispatch mode replayed there."""
    model = sdpa_model(arch)
    model.train()
    mode = reversible(model, batch)
    replayed_in_mode = []
    replay = scoped._Replay.__torch_dispatch__

    def counting_replay(self, func, types, args=(), kwargs=None):
        replayed_in_mode.append("scaled_dot_product" in func.__name__)
        return replay(self, func, types, args, kwargs)

    monkeypatch.setattr(scoped._Replay, "__torch_dispatch__", counting_replay)
    loss = model(**batch).loss
    with _AttentionKernels() as kernels:
        loss.backward()
    mode.teardown()
    return {name: param.grad for name, param in model.named_parameters()}, kernels.count, sum(replayed_in_mode)


@pytest.mark.parametrize("arch", KERNEL_ARCHS)
def test_a_kept_sdpa_kernel_is_replayed_without_running_it_with_or_without_the_dispatch_mode(arch, monkeypatch):
    batch = tiny_batch(2, 40, seed=3)
    grads, recomputed, in_mode = _grads_and_recomputed_kernels(arch, batch, monkeypatch)
    assert (recomputed, in_mode) == (0, 0), "the kept kernel ran again, or its replay went through the dispatch mode"
    # Where the kernel's saved tensors cannot all be told apart as arguments or outputs, the recompute
    # hands the cached outputs back in the dispatch mode instead.
    monkeypatch.setattr(kernel_call, "_layout", lambda *args: None)
    grads_in_mode, recomputed, in_mode = _grads_and_recomputed_kernels(arch, batch, monkeypatch)
    layers = len(find_decoder_layers(sdpa_model(arch))[1])
    assert (recomputed, in_mode) == (0, layers), "each layer's kernel replayed in the dispatch mode, none run"
    differ = [name for name in grads if not torch.equal(grads[name], grads_in_mode[name])]
    assert not differ, f"gradients differ between the two replays: {differ}"


def test_teardown_restores_the_attention_registry_and_the_hooks():
    model = sdpa_model("llama")
    model.train()
    registry = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    first = reversible(model, tiny_batch(2, 16))
    other = sdpa_model("llama", seed=1)
    other.train()
    second = reversible(other, tiny_batch(2, 16))
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
    first.teardown()
    model(**tiny_batch(2, 16)).loss.backward()  # the other model's scope still routes, this one passes through
    second.teardown()
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == registry
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_a_plan_that_keeps_an_op_of_the_layer_itself_runs_per_op():
    _, layers = find_decoder_layers(tiny_model("gpt_neox"))
    plan = RecomputePlan(keep=frozenset({OpKey(0, "", "aten.addmm.default", 0)}), recompute=frozenset(),
                         keep_unseen_expensive=True, kept_bytes=0, minimum_bytes=0, keep_all_bytes=0,
                         recompute_flops=0, layer_flops=0)
    assert scopes_of(plan, layers) is None
    nested = dataclasses.replace(plan, keep=frozenset({OpKey(0, "attention", "aten.bmm.default", 0),
                                                       OpKey(0, "attention.dense", "aten.addmm.default", 0)}))
    assert scopes_of(nested, layers).modules == {0: ["attention"]}, "a scope inside another is covered by it"


def test_compiled_forward_runs_per_op_and_scoped_on_request_refuses_it():
    batch = tiny_batch(2, 16)
    model = tiny_model("gpt_neox")
    model.train()
    mode = ReversibleMode(model, find_layers=find_decoder_layers)
    with pytest.warns(UserWarning, match="runs its plan per-op, not scoped: the forward is compiled"):
        mode.setup(batch, compiling=True)
    assert mode.status()["execution"] == "per_op" and "torch.compile" in mode.status()["execution_reason"]
    mode.teardown()
    # A trainer that compiles says so at construction (a graph break can hide it from the first forward).
    mode = ReversibleMode(model, find_layers=find_decoder_layers, compiled=True)
    with pytest.warns(UserWarning, match="runs its plan per-op"):
        mode.setup(batch)
    assert mode.status()["execution"] == "per_op"
    mode.teardown()
    mode = ReversibleMode(model, find_layers=find_decoder_layers, execution="per_op")
    mode.setup(batch)
    assert mode.status()["execution_reason"] == "asked for (execution='per_op')"
    mode.teardown()
    mode = ReversibleMode(model, find_layers=find_decoder_layers, execution="scoped")
    with pytest.raises(BWSKError, match="execution='auto' or 'per_op'"):
        mode.setup(batch, compiling=True)
    mode.teardown()
    with pytest.raises(BWSKError, match="unknown execution"):
        ReversibleMode(model, find_layers=find_decoder_layers, execution="fast")


def _checkpoint_call(self, *args, **kwargs):
    """transformers 5.17's GradientCheckpointingLayer: the checkpoint wraps `__call__`, hooks inside it."""
    if not (self.gradient_checkpointing and self.training):
        return torch.nn.Module.__call__(self, *args, **kwargs)

    def call(*inputs):
        self.gradient_checkpointing = False  # the 5.23 forward wrapper must not checkpoint again inside
        try:
            return torch.nn.Module.__call__(self, *inputs, **kwargs)
        finally:
            self.gradient_checkpointing = True

    return self._gradient_checkpointing_func(call, *args)


@pytest.mark.parametrize("execution", ["scoped", "per_op"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_layers_checkpointed_around_call_as_transformers_5_17_does(monkeypatch, execution, attention):
    build = sdpa_model if attention == "sdpa" else tiny_model
    conventional, model = build("gpt_neox"), build("gpt_neox")
    conventional.train()
    model.train()
    batch = tiny_batch(2, 24)
    mode = reversible(model, batch, execution)
    layer_class = type(find_decoder_layers(model)[1][0])
    assert issubclass(layer_class, GradientCheckpointingLayer)
    monkeypatch.setattr(layer_class, "__call__", _checkpoint_call, raising=False)
    mode.policy.decisions = {}
    loss = model(**batch).loss
    loss.backward()
    expected = conventional(**batch).loss
    expected.backward()
    assert_tensors_close(loss, expected, rtol=1e-5, atol=1e-6, name="loss")
    assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    assert mode.status()["plan_fidelity"]["plan_misses"] == 0
    assert mode.plan.keep, "the plan keeps something: the next line checks each kept op"
    assert all(mode.policy.decisions.get(key) is True for key in mode.plan.keep), "every kept op decided as planned"
    mode.teardown()


def autocast_forward(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch).loss


def test_under_bf16_autocast_scoped_equals_per_op_less_the_skipped_bytes_with_equal_flops_and_gradients():
    # Autocast casts inside F.linear, so kept linears replay through the dispatch mode there.
    batch = tiny_batch(2, 32, seed=2)
    results, skipped = {}, {}
    for execution in ("scoped", "per_op"):
        model = sdpa_model("llama")
        model.train()
        mode = reversible(model, batch, execution)
        # One forward per autocast region, as in training: the region caches its weight casts.
        kept = bytes_kept_for_backward(lambda: autocast_forward(model, batch)).activation_bytes
        flops = count_train_flops(lambda: autocast_forward(model, batch).backward())
        model.zero_grad()
        loss = autocast_forward(model, batch)
        loss.backward()
        results[execution] = (kept, flops, loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        assert mode.status()["plan_fidelity"]["plan_misses"] == 0
        skipped[execution] = mode.plan.skipped_bytes
        mode.teardown()
    (kept, flops, loss, grads), (kept_p, flops_p, loss_p, grads_p) = results["scoped"], results["per_op"]
    # The skipped down projection (bf16) goes through the dispatch mode here, as autocast's casts make it do.
    assert skipped["per_op"] == 0 and skipped["scoped"] > 0, skipped
    # The plan was traced outside autocast (fp32 bytes); the skipped outputs ran in bf16, half of that.
    assert (kept, flops) == (kept_p - skipped["scoped"] // 2, flops_p)
    assert torch.equal(loss, loss_p)
    assert all(torch.equal(grads[name], grads_p[name]) for name in grads), "gradients differ from per-op's"


@pytest.mark.parametrize("weight_shape", [(8, 8), (5, 8)])
def test_linear_layout_names_what_f_linear_saves_and_refuses_the_unknown(weight_shape):
    weight = torch.randn(weight_shape, requires_grad=True)
    bias = torch.randn(weight_shape[0], requires_grad=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    # Square weights: the transpose has the weight's shape, told apart by its strides.
    assert _linear_layout(x, weight, bias) == ("x2d", "wt")
    assert set(_linear_layout(x, weight, None)) == {"x2d", "wt"}
    assert _linear_layout(x, weight.detach(), bias) == ("wt",), "a frozen weight (LoRA's base layer): no input saved"
    assert _linear_layout(x[0], weight, bias) == ("x", "wt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _linear_layout(x, weight, bias) is None, "autocast's casts are not views of input or weight"
    assert _linear_layout(x.transpose(0, 1), weight, bias) is None, "a non-contiguous input may be copied"

"""Attention FLOPs by our own formulas (`hf_bwsk.analysis.attention_flops`): hand-computed values on
every attention op of the installed torch, torch's own counts where torch counts the shape, and the
analysis and train-step counts of a grouped-query-attention Llama (which torch 2.11's counter rejects)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_batch, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from transformers import AutoModelForCausalLM

from hf_bwsk.analysis import analyze
from hf_bwsk.analysis.attention_flops import ATTENTION_FLOP_FORMULAS
from hf_bwsk.memory.measure import count_train_flops

aten = torch.ops.aten
CPU_FORWARD = aten._scaled_dot_product_flash_attention_for_cpu
CPU_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward


def bmm(batch, m, k, n):
    """A batched [m, k] @ [k, n]: one multiply and one add per term."""
    return 2 * batch * m * k * n


def hand_forward(b, h_q, s_q, s_k, d_qk, d_v):
    """Q @ K^T, then scores @ V, over all query heads (each shares a key/value head)."""
    return bmm(b * h_q, s_q, d_qk, s_k) + bmm(b * h_q, s_q, s_k, d_v)


def hand_backward(b, h_q, s_q, s_k, d_qk, d_v):
    """torch's convention: the scores recomputed, grad scores, grad V, grad Q, grad K."""
    return (bmm(b * h_q, s_q, d_qk, s_k) + bmm(b * h_q, s_q, d_v, s_k) + bmm(b * h_q, s_k, s_q, d_v)
            + bmm(b * h_q, s_q, s_k, d_qk) + bmm(b * h_q, d_qk, s_q, s_k))


def test_hand_formulas_are_the_usual_closed_forms():
    b, h, s_q, s_k, d = 2, 8, 5, 7, 16
    assert hand_forward(b, h, s_q, s_k, d, d) == 4 * b * h * s_q * s_k * d
    assert hand_backward(b, h, s_q, s_k, d, d) == 10 * b * h * s_q * s_k * d


def test_every_attention_op_of_the_installed_torch_has_a_formula():
    expected = [
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
    ]
    expected += [name + "_backward" for name in expected[:4]]
    expected += ["_flash_attention_backward", "_efficient_attention_backward"]
    installed = [name for name in expected if getattr(aten, name, None) is not None]
    missing = [name for name in installed if getattr(aten, name) not in ATTENTION_FLOP_FORMULAS]
    assert missing == [], f"attention ops of torch {torch.__version__} without a formula: {missing}"
    # The CPU ones are what this suite runs: they must be there on every supported torch.
    assert CPU_FORWARD in ATTENTION_FLOP_FORMULAS and CPU_BACKWARD in ATTENTION_FLOP_FORMULAS


def _raw(formula):
    """One of torch's registered formulas (already shape-wrapped), passed to FlopCounterMode unwrapped."""
    def raw(*args, **kwargs):
        return formula(*args, **kwargs)

    raw._get_raw = True
    return raw


def counts(fn, mapping):
    """FLOPs of ``fn()`` per op packet under FlopCounterMode with ``mapping`` as its custom_mapping."""
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_flop_counts().get("Global", {})


def torch_counts(fn):
    """torch's own counts of ``fn()``; it registers no formula for the CPU flash ops, so its CUDA flash
    ones (same arguments, same [batch, heads, seq, dim] layout) stand in for them."""
    mapping = {
        CPU_FORWARD: _raw(flop_registry[aten._scaled_dot_product_flash_attention]),
        CPU_BACKWARD: _raw(flop_registry[aten._scaled_dot_product_flash_attention_backward]),
    }
    return counts(fn, mapping)


def our_counts(fn):
    return counts(fn, ATTENTION_FLOP_FORMULAS)


# (query heads, key/value heads, q/k head dim, v head dim): the CPU flash kernel takes fewer key/value
# heads natively (with enable_gqa=True), and needs d_v == d_qk.
CPU_FLASH_SHAPES = {"mha": (8, 8, 16, 16), "gqa": (8, 2, 16, 16), "mqa": (8, 1, 16, 16)}


def sdpa_step(b, h_q, h_kv, s_q, s_k, d_qk, d_v, causal, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h_q, s_q, d_qk, generator=generator, requires_grad=True)
    key = torch.randn(b, h_kv, s_k, d_qk, generator=generator, requires_grad=True)
    value = torch.randn(b, h_kv, s_k, d_v, generator=generator, requires_grad=True)

    def step():
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=h_kv != h_q)
        out.sum().backward()

    return step


def assert_equals_torch_s_count(ours: dict, count_by_torch, h_q: int, h_kv: int, case: str) -> None:
    """Our counts equal torch's own counter's, or the test skips where that counter rejects the head counts."""
    try:
        theirs = count_by_torch()
    except AssertionError as error:
        assert h_kv != h_q, f"torch {torch.__version__} rejects multi-head attention: {error}"
        pytest.skip(f"torch {torch.__version__}'s own counter rejects {h_q} query heads over {h_kv} key/value "
                    f"heads ({error}); our count matched the hand-computed one")
    assert ours == theirs, f"{case}: ours {ours} != torch's {theirs}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", sorted(CPU_FLASH_SHAPES))
def test_cpu_flash_forward_and_backward(heads, causal):
    h_q, h_kv, d_qk, d_v = CPU_FLASH_SHAPES[heads]
    b, s_q = 2, 6
    s_k = s_q if causal else 10
    step = sdpa_step(b, h_q, h_kv, s_q, s_k, d_qk, d_v, causal)
    sizes = (b, h_q, s_q, s_k, d_qk, d_v)
    ours = our_counts(step)
    assert set(ours) == {CPU_FORWARD, CPU_BACKWARD}, f"{heads}: expected the fused CPU ops alone, counted {ours}"
    assert ours[CPU_FORWARD] == hand_forward(*sizes), f"{heads} forward {sizes}"
    assert ours[CPU_BACKWARD] == hand_backward(*sizes), f"{heads} backward {sizes}"
    assert_equals_torch_s_count(ours, lambda: torch_counts(step), h_q, h_kv, heads)


# The math path (forced, or the CPU fallback when the value head dim differs) runs bmm's, which torch
# counts itself; our mapping must leave those counts alone.
MATH_CASES = {
    "mha_dv_fallback": ((8, 8, 16, 24), False), "gqa_dv_fallback": ((8, 2, 16, 24), False),
    "mha_forced": ((8, 8, 16, 16), True), "gqa_forced": ((8, 2, 16, 16), True), "mqa_forced": ((8, 1, 16, 16), True),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", sorted(MATH_CASES))
def test_math_path_is_counted_by_torch_and_by_us_alike(case, causal):
    (h_q, h_kv, d_qk, d_v), forced = MATH_CASES[case]
    b, s_q = 2, 6
    s_k = s_q if causal else 10
    sdpa = sdpa_step(b, h_q, h_kv, s_q, s_k, d_qk, d_v, causal)

    def step():
        if forced:
            with sdpa_kernel(SDPBackend.MATH):
                return sdpa()
        return sdpa()

    ours, theirs = our_counts(step), counts(step, {})
    assert set(ours) == {aten.bmm}, f"expected the math path's bmm's alone, counted {ours}"
    assert ours == theirs, f"ours {ours} != torch's {theirs}"
    # Two bmm's forward, two per bmm backward (no recompute: the math path keeps the scores).
    sizes = (b, h_q, s_q, s_k, d_qk, d_v)
    assert ours[aten.bmm] == 3 * hand_forward(*sizes), f"math path {sizes}"


# The CUDA-only ops, run on meta tensors (their meta kernels give the shapes) and called directly.
B, H_Q, H_KV, S_Q, S_K, D_QK, D_V = 2, 8, 2, 5, 7, 16, 24
SIZES = (B, H_Q, S_Q, S_K, D_QK, D_V)


def meta(*shape):
    return torch.empty(*shape, device="meta")


def heads_first(h_kv):
    return meta(B, H_Q, S_Q, D_QK), meta(B, h_kv, S_K, D_QK), meta(B, h_kv, S_K, D_V)


def seq_first(h_kv):
    return meta(B, S_Q, H_Q, D_QK), meta(B, S_K, h_kv, D_QK), meta(B, S_K, h_kv, D_V)


def _flash_attention_forward(h_kv):
    return aten._flash_attention_forward(*seq_first(h_kv), None, None, S_Q, S_K, 0.0, False, False)


def _flash_attention_backward(h_kv):
    out = meta(B, S_Q, H_Q, D_V)
    return aten._flash_attention_backward(out, *seq_first(h_kv), out, meta(B, H_Q, S_Q), None, None, S_Q, S_K, 0.0,
                                          False, meta(2), meta(0))


def _efficient_attention_forward(h_kv):
    return aten._efficient_attention_forward(*seq_first(h_kv), None, None, None, None, None, 0.0, 0)


def _efficient_attention_backward(h_kv):
    q, k, v = seq_first(h_kv)
    out = meta(B, S_Q, H_Q, D_V)
    return aten._efficient_attention_backward(out, q, k, v, None, out, None, None, S_Q, S_K, meta(B, H_Q, S_Q), 0.0,
                                              meta(()), meta(()), 0, False)


def _scaled_dot_product_flash_attention(h_kv):
    return aten._scaled_dot_product_flash_attention(*heads_first(h_kv))


def _scaled_dot_product_efficient_attention(h_kv):
    return aten._scaled_dot_product_efficient_attention(*heads_first(h_kv), None, True)


def _scaled_dot_product_cudnn_attention(h_kv):
    return aten._scaled_dot_product_cudnn_attention(*heads_first(h_kv), None, True)


def _scaled_dot_product_flash_attention_backward(h_kv):
    out = meta(B, H_Q, S_Q, D_V)
    return aten._scaled_dot_product_flash_attention_backward(out, *heads_first(h_kv), out, meta(B, H_Q, S_Q), None,
                                                             None, S_Q, S_K, 0.0, False, meta(2), meta(0))


def _scaled_dot_product_efficient_attention_backward(h_kv):
    out = meta(B, H_Q, S_Q, D_V)
    return aten._scaled_dot_product_efficient_attention_backward(
        out, *heads_first(h_kv), meta(B, H_Q, S_Q, S_K), out, meta(B, H_Q, S_Q), meta(()), meta(()), 0.0,
        [True, True, True, False])


def _scaled_dot_product_cudnn_attention_backward(h_kv):
    out = meta(B, H_Q, S_Q, D_V)
    return aten._scaled_dot_product_cudnn_attention_backward(
        out, *heads_first(h_kv), out, meta(B, H_Q, S_Q), meta(()), meta(()), meta(B, H_Q, S_Q, S_K), None, None,
        S_Q, S_K, 0.0, False)


FORWARD_CALLS = (_scaled_dot_product_flash_attention, _scaled_dot_product_efficient_attention,
                 _scaled_dot_product_cudnn_attention, _flash_attention_forward, _efficient_attention_forward)
BACKWARD_CALLS = (_scaled_dot_product_flash_attention_backward, _scaled_dot_product_efficient_attention_backward,
                  _scaled_dot_product_cudnn_attention_backward, _flash_attention_backward,
                  _efficient_attention_backward)
META_CALLS = {call.__name__: (call, hand_forward) for call in FORWARD_CALLS}
META_CALLS |= {call.__name__: (call, hand_backward) for call in BACKWARD_CALLS}
# torch reads the dense [batch, seq, heads, dim] inputs of these as [batch, heads, seq, dim] (the
# efficient ones on every torch so far, the flash ones before 2.13), so its counts are no reference.
SEQ_FIRST = {"_flash_attention_forward", "_flash_attention_backward",
             "_efficient_attention_forward", "_efficient_attention_backward"}


@pytest.mark.parametrize("h_kv", [H_Q, H_KV, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", sorted(META_CALLS))
def test_cuda_ops_on_meta_tensors(name, h_kv):
    call, hand = META_CALLS[name]
    packet = getattr(aten, name)
    ours = our_counts(lambda: call(h_kv))
    assert ours == {packet: hand(*SIZES)}, f"{name} at (b, h_q, s_q, s_k, d_qk, d_v) = {SIZES}, {h_kv} kv heads"
    if name in SEQ_FIRST:
        return
    assert_equals_torch_s_count(ours, lambda: counts(lambda: call(h_kv), {}), H_Q, h_kv, f"{name}, {h_kv} kv heads")


def shapes(*sizes):
    return tuple(torch.Size(size) for size in sizes)


def test_formulas_called_directly_on_shapes():
    q, k, v = shapes((B, S_Q, H_Q, D_QK), (B, S_K, H_KV, D_QK), (B, S_K, H_KV, D_V))
    out = torch.Size((B, S_Q, H_Q, D_V))
    forward, backward = hand_forward(*SIZES), hand_backward(*SIZES)
    direct = {
        "_flash_attention_forward": (forward, (q, k, v, None, None, S_Q, S_K, 0.0, False, False)),
        "_efficient_attention_forward": (forward, (q, k, v, None, None, None, None, None, 0.0, 0)),
        "_flash_attention_backward": (backward, (out, q, k, v, out, (B, H_Q, S_Q), None, None, S_Q, S_K)),
        "_efficient_attention_backward": (backward, (out, q, k, v, None, out, None, None, S_Q, S_K)),
    }
    # torch 2.13+: the output comes first.
    direct["_flash_attention_forward_no_dropout_inplace"] = (forward, (out, *direct["_flash_attention_forward"][1]))
    for name, (hand, args) in direct.items():
        if getattr(aten, name, None) is None:
            continue
        got = ATTENTION_FLOP_FORMULAS[getattr(aten, name)](*args, out_shape=None)
        assert got == hand, f"{name}: {got} != hand-computed {hand}"
    q, k, v = shapes((B, H_Q, S_Q, D_QK), (B, H_KV, S_K, D_QK), (B, H_KV, S_K, D_V))
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable"):
        got = ATTENTION_FLOP_FORMULAS[getattr(aten, name)](q, k, v, out_shape=None)
        assert got == forward, f"{name}: {got} != hand-computed {forward}"
        got = ATTENTION_FLOP_FORMULAS[getattr(aten, name + "_backward")](out, q, k, v, out_shape=None)
        assert got == backward, f"{name}_backward: {got} != hand-computed {backward}"
    got = ATTENTION_FLOP_FORMULAS[aten._scaled_dot_product_attention_math_for_mps](q, k, v, out_shape=None)
    assert got == forward, f"_scaled_dot_product_attention_math_for_mps: {got} != hand-computed {forward}"


def test_packed_sequences_count_each_at_the_longest():
    sequences, total, longest_q, longest_k = 3, 12, 6, 9
    q, k, v = shapes((total, H_Q, D_QK), (20, H_KV, D_QK), (20, H_KV, D_V))
    offsets = torch.Size((sequences + 1,))
    sizes = (sequences, H_Q, longest_q, longest_k, D_QK, D_V)
    flash = ATTENTION_FLOP_FORMULAS[aten._flash_attention_forward]
    got = flash(q, k, v, offsets, offsets, longest_q, longest_k, 0.0, False, False, out_shape=None)
    assert got == hand_forward(*sizes), f"flash, packed: {got}"
    efficient = ATTENTION_FLOP_FORMULAS[aten._efficient_attention_backward]
    q, k, v = (torch.Size((1, *shape)) for shape in (q, k, v))
    got = efficient(q, q, k, v, None, q, offsets, offsets, longest_q, longest_k, out_shape=None)
    assert got == hand_backward(*sizes), f"efficient backward, packed: {got}"


def test_packed_flash_on_meta_tensors_matches_torch():
    """Meta offsets hold no lengths: torch counts every sequence at the longest too (here with one
    key/value head per query head, which every supported torch counts)."""
    sequences, longest_q, longest_k = 3, 6, 9

    def call():
        q = meta(sequences * longest_q, H_Q, D_QK)
        k, v = meta(sequences * longest_k, H_Q, D_QK), meta(sequences * longest_k, H_Q, D_QK)
        offsets = torch.empty(sequences + 1, dtype=torch.int32, device="meta")
        return aten._flash_attention_forward(q, k, v, offsets, offsets, longest_q, longest_k, 0.0, False, False)

    ours, theirs = our_counts(call), counts(call, {})
    hand = hand_forward(sequences, H_Q, longest_q, longest_k, D_QK, D_QK)
    assert ours == {aten._flash_attention_forward: hand}, f"ours {ours}, hand-computed {hand}"
    assert ours == theirs, f"ours {ours} != torch's {theirs}"


# A tiny Llama with grouped-query attention through sdpa: 4 query heads share 2 key/value heads.
LAYERS, HEADS, HEAD_DIM = 2, 4, 8
BATCH, SEQ = 2, 16


def gqa_llama():
    config = tiny_config("llama")
    assert (config.num_attention_heads, config.num_key_value_heads) == (HEADS, 2), "the tiny Llama changed"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def attention_per_layer(hand):
    return hand(BATCH, HEADS, SEQ, SEQ, HEAD_DIM, HEAD_DIM)


def test_analysis_of_a_gqa_llama_counts_its_attention():
    report = analyze(gqa_llama(), seq_len=SEQ, batch_size=BATCH)
    attention = [record for record in report.records if "attention" in record.op]
    assert [record.op for record in attention] == [str(CPU_FORWARD.default)] * LAYERS, (
        f"expected one fused CPU attention per layer, got {[record.op for record in attention]}")
    for record in attention:
        assert record.flops == attention_per_layer(hand_forward), f"layer {record.layer}: {record.flops} FLOPs"
    key_heads = {record.input_shapes[1][1] for record in attention}
    assert key_heads == {2}, f"key heads {key_heads}: transformers repeated them, grouped-query attention is untested"


def test_train_flops_of_a_gqa_llama_step():
    model = gqa_llama()
    batch = tiny_batch(BATCH, SEQ)

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    total = count_train_flops(step)
    # torch's plain counter counts no CPU flash attention (it has no formula for it), the rest as we do.
    plain = counts(step, {})
    rest = sum(flops for packet, flops in plain.items() if packet not in ATTENTION_FLOP_FORMULAS)
    attention = LAYERS * (attention_per_layer(hand_forward) + attention_per_layer(hand_backward))
    assert total == rest + attention, f"{total} != {rest} (not attention, torch's) + {attention} (attention, by hand)"
    assert rest > 0

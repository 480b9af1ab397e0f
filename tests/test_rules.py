"""S/K/Gray rules on single ops, traced for real (CPU tensors) through the op tracer."""

import pytest
import torch
import torch.nn.functional as F

from hf_bwsk.analysis.trace import trace_call


def data_path_ops(fn, *shapes, seed=0):
    """(op, kind, reason) of the data-path ops that ``fn`` runs on random activations of ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*shape, generator=generator) for shape in shapes]
    records, skipped = trace_call(fn, *inputs)
    return [(record.op, record.kind, record.reason) for record in records if record.data_path], skipped


def only_kind(fn, *shapes):
    ops, _ = data_path_ops(fn, *shapes)
    assert len(ops) == 1, f"expected one data-path op, got {ops}"
    return ops[0][1]


@pytest.mark.parametrize(
    "name, fn, kind",
    [
        ("tanh", torch.tanh, "S"),
        ("sigmoid", torch.sigmoid, "S"),
        ("exp", torch.exp, "S"),
        ("relu", torch.relu, "K"),
        ("gelu", F.gelu, "K"),
        ("silu", F.silu, "K"),
        ("leaky_relu", F.leaky_relu, "S"),
        ("softmax", lambda x: torch.softmax(x, dim=-1), "K"),
        ("log_softmax", lambda x: torch.log_softmax(x, dim=-1), "K"),
        ("layer_norm", lambda x: F.layer_norm(x, (8,)), "K"),
        ("mean", lambda x: x.mean(-1), "K"),
        ("square", lambda x: x.pow(2), "K"),
        ("cube", lambda x: x.pow(3), "S"),
        ("reshape", lambda x: x.reshape(8, 4), "S"),
        ("transpose", lambda x: x.transpose(0, 1), "S"),
        ("scale by constant", lambda x: x * 3.0, "S"),
        ("comparison", lambda x: x > 0, "K"),
    ],
)
def test_single_op_kind(name, fn, kind):
    assert only_kind(fn, (4, 8)) == kind, name


def test_dropout_with_p_zero_is_skipped_and_p_positive_is_k():
    torch.manual_seed(0)
    ops, _ = data_path_ops(lambda x: F.dropout(x, p=0.0, training=True), (4, 8))
    assert ops == []
    ops, _ = data_path_ops(lambda x: F.dropout(x, p=0.1, training=False), (4, 8))
    assert ops == []
    ops, _ = data_path_ops(lambda x: F.dropout(x, p=0.1, training=True), (4, 8))
    assert [kind for _, kind, _ in ops] == ["K"], ops
    assert "dropout" in ops[0][2]


def test_identities_are_counted_apart():
    ops, skipped = data_path_ops(lambda x: x.clone().detach(), (4, 8))
    assert ops == []
    assert skipped == {"aten.clone.default": 1, "aten.detach.default": 1}


def test_linear_widening_is_s_and_narrowing_is_k():
    torch.manual_seed(0)
    widen, narrow = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    ops, _ = data_path_ops(widen, (4, 8))
    assert [(op, kind) for op, kind, _ in ops] == [("aten.addmm.default", "S")]
    ops, _ = data_path_ops(narrow, (4, 16))
    assert [(op, kind) for op, kind, _ in ops] == [("aten.addmm.default", "K")]
    # The weight's transpose is not on the data path: it is an auxiliary op.
    records, _ = trace_call(widen, torch.randn(4, 8))
    assert [(r.op, r.data_path) for r in records] == [("aten.t.default", False), ("aten.addmm.default", True)]


def test_attention_is_gray():
    fused = data_path_ops(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          (1, 2, 6, 4), (1, 2, 6, 4), (1, 2, 6, 4))[0]
    assert [kind for _, kind, _ in fused] == ["Gray"], fused
    scores = data_path_ops(lambda q, k: q @ k.transpose(-1, -2), (2, 6, 4), (2, 6, 4))[0]
    assert ("aten.bmm.default", "Gray") in [(op, kind) for op, kind, _ in scores], scores


def test_products_and_sums_depend_on_their_operands():
    weight = torch.randn(8)
    ops, _ = data_path_ops(lambda x: x * weight, (4, 8))
    assert [kind for _, kind, _ in ops] == ["S"]
    ops, _ = data_path_ops(lambda x, y: x * y, (4, 8), (4, 8))
    assert [kind for _, kind, _ in ops] == ["Gray"]
    ops, _ = data_path_ops(lambda x, y: x + y, (4, 8), (4, 8))
    assert [kind for _, kind, reason in ops] == ["S"] and "residual" in ops[0][2]
    ops, _ = data_path_ops(lambda x: x * torch.ones(8, dtype=torch.long), (4, 8))
    assert [kind for _, kind, _ in ops] == ["K"], "an integer mask zeroes elements"


def test_slices_are_k_unless_they_partition_their_source():
    ops, _ = data_path_ops(lambda x: x[:, :3] * 2, (4, 8))
    assert ops[0][:2] == ("aten.slice.Tensor", "K")
    # rotate_half: both halves are taken, so no element is lost.
    ops, _ = data_path_ops(lambda x: torch.cat((-x[:, 4:], x[:, :4]), dim=-1), (4, 8))
    slices = [kind for op, kind, _ in ops if op == "aten.slice.Tensor"]
    assert slices == ["S", "S"], ops
    # A scan reading every step of a sequence.
    ops, _ = data_path_ops(lambda x: [x[:, i] for i in range(x.shape[1])], (4, 3))
    assert [kind for _, kind, _ in ops] == ["S", "S", "S"], ops


def test_embedding_lookup_is_s():
    table = torch.nn.Embedding(10, 4)
    records, _ = trace_call(table, torch.tensor([[1, 2, 3]]))
    assert [(r.op, r.kind) for r in records if r.data_path] == [("aten.embedding.default", "S")]


def test_op_without_rule_is_gray_and_named():
    ops, _ = data_path_ops(torch.digamma, (4, 8))
    assert ops == [("aten.digamma.default", "Gray", "unclassified: aten.digamma")]


def test_records_carry_shapes_bytes_and_flops():
    linear = torch.nn.Linear(8, 16)
    records, _ = trace_call(linear, torch.randn(4, 8))
    addmm = records[-1]
    assert addmm.input_shapes == ((16,), (4, 8), (8, 16))
    assert addmm.output_shapes == ((4, 16),)
    assert addmm.output_bytes == 4 * 16 * 4
    assert addmm.flops == 2 * 4 * 8 * 16
    views, _ = trace_call(lambda x: x.view(32), torch.randn(4, 8))
    assert views[0].output_bytes == 0, "a view allocates nothing"


def test_bytes_of_a_folded_matmul_are_counted_once():
    weight = torch.randn(8, 16)
    records, _ = trace_call(lambda x: x @ weight, torch.randn(2, 4, 8))
    ops = [record.op for record in records]
    assert ops == ["aten.view.default", "aten.mm.default", "aten._unsafe_view.default"], ops
    assert sum(record.output_bytes for record in records) == 2 * 4 * 16 * 4


def test_trace_leaves_no_mark_on_the_callers_tensors():
    buffer = torch.zeros(4, 8)

    def write_into_buffer(x):
        buffer.add_(x)
        return buffer * 2

    x = torch.randn(4, 8)
    records, _ = trace_call(write_into_buffer, x)
    assert [(r.op, r.data_path) for r in records] == [("aten.add_.Tensor", True), ("aten.mul.Tensor", True)]
    # A second trace must not take the buffer for an activation.
    again, _ = trace_call(lambda y: (buffer * 3.0, y * 2.0), torch.randn(4, 8))
    assert [r.data_path for r in again] == [False, True]
    assert not hasattr(buffer, "_bwsk_origin") and not hasattr(x, "_bwsk_origin")

"""CALM report: sync points per sharding axis, and the axis recognition it rests on."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_config, tiny_model

from hf_bwsk.analysis import analyze, calm_report
from hf_bwsk.analysis.axes import AxisSizes, identifies_axes, model_sizes, probe_sizes
from hf_bwsk.analysis.trace import trace_call

LOSS = "aten.nll_loss_forward.default"


@pytest.fixture(scope="module", params=ARCHS)
def arch_calm(request):
    return request.param, calm_report(tiny_config(request.param))


def layer_sync_ops(report, axis, layer):
    return [(p.op, p.path_in_layer) for p in report.axes[axis].sync_points if p.layer == layer]


def test_along_batch_only_the_loss_synchronises(arch_calm):
    arch, report = arch_calm
    points = report.axes["batch"].sync_points
    assert [(p.op, p.layer) for p in points] == [(LOSS, None)], f"{arch}: {points}"
    assert report.sync_counts()["batch"] == 1


def test_along_hidden_the_norms_and_contractions_synchronise(arch_calm):
    arch, report = arch_calm
    for layer in range(report.num_layers):
        ops = {op.split(".")[1] for op, _ in layer_sync_ops(report, "hidden", layer)}
        assert ops & {"mm", "addmm"}, f"{arch} layer {layer}: no contraction among {ops}"
        assert ops & {"native_layer_norm", "mean"}, f"{arch} layer {layer}: no norm among {ops}"
    outside = {p.op for p in report.axes["hidden"].sync_points if p.layer is None}
    assert "aten._log_softmax.default" in outside, "the loss' softmax over the vocabulary"


def test_phases_and_sync_points_partition_the_data_path(arch_calm):
    arch, report = arch_calm
    for axis, axis_report in report.axes.items():
        covered = sum(phase.ops for phase in axis_report.phases) + len(axis_report.sync_points)
        data_ops = report.axes["batch"].phases[0].ops + 1  # everything before the loss, and the loss
        assert covered == data_ops, f"{arch} {axis}"
        sync_indices = {p.index for p in axis_report.sync_points}
        for phase in axis_report.phases:
            assert not any(phase.first <= index <= phase.last for index in sync_indices), (arch, axis, phase)
        assert sum(axis_report.layer_sync_counts.values()) + axis_report.outside_layers == len(sync_indices)


def test_gpt_neox_layer_synchronises_along_sequence_in_attention_only():
    report = calm_report(tiny_config("gpt_neox"))
    for layer in range(report.num_layers):
        ops = layer_sync_ops(report, "sequence", layer)
        assert ops and all(path.startswith("attention") for _, path in ops), ops
        # Meta tensors take the math attention path: scores, softmax over keys, weighted values.
        assert [op for op, _ in ops] == ["aten.bmm.default", "aten._safe_softmax.default", "aten.bmm.default"]


def test_real_model_synchronises_along_sequence_in_attention_only():
    report = calm_report(tiny_model("llama"))
    for layer in range(report.num_layers):
        ops = layer_sync_ops(report, "sequence", layer)
        assert ops and all(path.startswith("self_attn") for _, path in ops), ops


def test_mamba_layer_synchronises_along_sequence_in_its_conv_and_scan():
    report = calm_report(tiny_config("mamba"))
    for layer in range(report.num_layers):
        ops = layer_sync_ops(report, "sequence", layer)
        names = [op for op, _ in ops]
        assert all(path == "mixer" for _, path in ops), ops
        assert "aten.convolution.default" in names
        # The reference scan reads each step (select along the sequence) and stacks the outputs; the
        # loop over the steps is one logical op group, its sync points carry the repeat count.
        looped = [p for p in report.axes["sequence"].sync_points if p.layer == layer and p.repeats > 1]
        assert {p.op for p in looped} == {"aten.select.int"} and {p.repeats for p in looped} == {report.seq_len - 1}
        assert "aten.stack.default" in names


def test_a_report_at_ambiguous_sizes_is_retraced_at_probe_sizes():
    config = tiny_config("gpt_neox")
    ambiguous = analyze(config, seq_len=16, batch_size=2)
    assert ambiguous.axis_sizes is None
    assert all(not record.mixes for record in ambiguous.records)
    direct = calm_report(config)
    assert calm_report(ambiguous).to_dict() == direct.to_dict()
    probed = analyze(config, seq_len=direct.seq_len, batch_size=direct.batch_size)
    assert probed.axis_sizes == {"batch": direct.batch_size, "sequence": direct.seq_len}
    assert calm_report(probed).to_dict() == direct.to_dict()


def test_table_lists_every_axis():
    report = calm_report(tiny_config("gpt2"))
    table = report.to_table()
    for axis, parallelism in (("batch", "data parallel"), ("sequence", "context parallel"),
                              ("hidden", "tensor parallel")):
        assert f"{axis:<9} {parallelism}" in table
    assert LOSS in table
    assert set(report.to_dict()["sync_counts"]) == {"batch", "sequence", "hidden"}


def test_axes_are_recognised_by_size():
    axes = AxisSizes(batch=7, sequence=17)
    assert axes.axes_of(7) == {"batch"}
    assert axes.axes_of(17) == {"sequence"}
    assert axes.axes_of(7 * 17) == {"batch", "sequence"}
    assert axes.axes_of(7 * 4) == {"batch", "hidden"}  # batch x heads
    assert axes.axes_of(64) == {"hidden"}
    assert axes.axes_of(1) == frozenset()


def test_probe_sizes_divide_no_model_size():
    model = tiny_model("gpt_neox")
    sizes = model_sizes(model)
    assert {32, 128, 4} <= sizes
    probe = probe_sizes(sizes)
    assert identifies_axes(probe.batch, probe.sequence, sizes)
    assert all(size % probe.batch and size % probe.sequence for size in sizes)
    assert not identifies_axes(2, 16, sizes), "2 divides the hidden size, 16 is not prime"
    assert not identifies_axes(7, 7, sizes), "batch and sequence must differ"


@pytest.mark.parametrize(
    "name, fn, mixes",
    [
        ("element-wise", lambda x: torch.tanh(x) * 2, [set(), set()]),
        ("softmax over features", lambda x: torch.softmax(x, -1), [{"hidden"}]),
        ("softmax over positions", lambda x: torch.softmax(x, 1), [{"sequence"}]),
        ("sum of everything", lambda x: x.sum(), [{"batch", "sequence", "hidden"}]),
        ("layer norm", lambda x: F.layer_norm(x, (8,)), [{"hidden"}]),
        ("cumsum over positions", lambda x: x.cumsum(1), [{"sequence"}]),
        ("sort over features", lambda x: x.sort(), [{"hidden"}]),
        ("token projection", lambda x: x.reshape(-1, 8) @ torch.randn(8, 4), [set(), {"hidden"}]),
        ("scores between positions", lambda x: x @ x.transpose(1, 2), [set(), {"hidden", "sequence"}]),
        ("causal conv over positions",
         lambda x: F.conv1d(x.transpose(1, 2), torch.randn(8, 1, 3), padding=2, groups=8), [set(), {"sequence"}]),
        ("one step of a scan", lambda x: x[:, 4], [{"sequence"}]),
        ("a slice of features", lambda x: x[..., :4], [set()]),
    ],
)
def test_single_op_mixing(name, fn, mixes):
    axes = AxisSizes(batch=7, sequence=17)
    records, _ = trace_call(fn, torch.randn(7, 17, 8), axes=axes)
    found = [set(record.mixes) for record in records if record.data_path]
    assert found == mixes, f"{name}: {[(r.op, sorted(r.mixes)) for r in records if r.data_path]}"

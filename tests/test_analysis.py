"""End-to-end op-level analysis of tiny random-init models of every supported architecture."""

import json
import math

import pytest
import torch
from tiny_models import ARCHS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GPTNeoXModel, ViTConfig

from hf_bwsk.analysis import SKReport, analyze, find_decoder_layers
from hf_bwsk.errors import BWSKError
from hf_bwsk.models import load_config

SHAPE = {"seq_len": 16, "batch_size": 2}


@pytest.fixture(scope="module", params=ARCHS)
def arch_report(request):
    return request.param, analyze(tiny_config(request.param), **SHAPE)


def test_every_op_is_classified(arch_report):
    arch, report = arch_report
    assert report.unclassified == [], f"{arch}: ops without a rule: {report.unclassified}"
    assert {record.kind for record in report.records} <= {"S", "K", "Gray"}


def test_ratios_sum_to_one_for_every_weight(arch_report):
    arch, report = arch_report
    for by in ("count", "bytes", "flops"):
        ratios = report.ratios(by)
        assert set(ratios) == {"S", "K", "Gray"}
        assert math.isclose(sum(ratios.values()), 1.0, rel_tol=1e-9), f"{arch} by {by}: {ratios}"
    counts = report.op_counts()  # logical ops: a loop over the sequence counts its body once
    assert sum(counts.values()) == len(report.logical_records)
    assert report.ratios("count")["K"] == pytest.approx(counts["K"] / len(report.logical_records))


def test_every_layer_has_data_path_ops_and_the_loss_is_last(arch_report):
    arch, report = arch_report
    assert report.num_layers == 2
    for layer in range(report.num_layers):
        ops = report.layer_records(layer)
        assert ops, f"{arch}: no data-path op in layer {layer}"
        assert all(record.path_in_layer is not None for record in ops)
    # Per-layer op sequences are identical across the layers of one model.
    first, second = ([(r.op, r.kind, r.path_in_layer) for r in report.layer_records(i)] for i in (0, 1))
    assert first == second, arch
    loss = report.data_records[-1]
    assert loss.op == "aten.nll_loss_forward.default" and loss.kind == "K" and loss.module_path == ""
    assert loss.layer is None


def test_auxiliary_ops_stay_out_of_the_ratios(arch_report):
    arch, report = arch_report
    auxiliary = [record for record in report.records if not record.data_path]
    assert auxiliary, f"{arch}: the mask/position ops should be recorded as auxiliary"
    assert len(report.data_records) + len(auxiliary) == len(report.records)
    assert sum(report.op_counts().values()) == len(report.logical_records)


def test_contractions_carry_flops_and_bytes(arch_report):
    arch, report = arch_report
    matmuls = [r for r in report.data_records if r.op.split(".")[1] in ("mm", "addmm", "bmm", "convolution")]
    assert matmuls and all(r.flops > 0 for r in matmuls), arch
    assert all(r.output_bytes > 0 for r in matmuls)
    assert sum(r.flops for r in report.data_records) == sum(r.flops for r in matmuls + [
        r for r in report.data_records if r.op.startswith("aten._scaled_dot_product")])


def test_json_round_trip(arch_report, tmp_path):
    arch, report = arch_report
    path = report.save_json(tmp_path / "report.json")
    loaded = SKReport.from_json(path)
    assert loaded.to_dict() == report.to_dict()
    assert loaded.records == report.records
    assert loaded.to_table() == report.to_table()


def test_records_carry_their_data_flow(arch_report):
    arch, report = arch_report
    records = report.records
    assert all(all(p < r.index for p in r.producers) for r in records), arch
    # Every data-path op after the embedding reads the output of an earlier data-path op.
    data = report.data_records
    assert all(r.producers for r in data[1:]), arch
    assert all(r.activation_input_numel > 0 for r in data)


def test_json_without_data_flow_fields_still_loads(arch_report, tmp_path):
    arch, report = arch_report
    data = report.to_dict()
    for record in data["records"]:
        for field in ("producers", "activation_input_numel", "relabels"):
            del record[field]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = SKReport.from_json(path)
    assert [r.kind for r in loaded.records] == [r.kind for r in report.records]
    assert all(r.producers == () and r.activation_input_numel == 0 for r in loaded.records)


def test_table_and_summary(arch_report):
    arch, report = arch_report
    table = report.to_table()
    assert "unclassified ops: none" in table
    assert "aten.nll_loss_forward.default" in table
    summary = report.summary()
    assert summary["ratios"]["count"] == report.ratios("count")
    assert summary["op_counts"] == report.op_counts()
    assert summary["module_view"] == report.module_view.ratios()
    assert (summary["seq_len"], summary["batch_size"]) == (16, 2)


def test_real_model_is_traced_on_its_device_and_left_unchanged():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox"), attn_implementation="sdpa")
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = analyze(model, **SHAPE)
    assert report.device == "cpu" and report.unclassified == []
    assert model.training, "the train/eval mode must be left as it was"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())
    # The real CPU run takes the fused attention kernel: one Gray op per layer.
    fused = [r for r in report.data_records if r.op.startswith("aten._scaled_dot_product")]
    assert [r.layer for r in fused] == [0, 1] and {r.kind for r in fused} == {"Gray"}
    assert all(r.flops > 0 for r in fused)


def test_builtin_configs_are_fully_classified():
    for name in ("pythia-70m", "mamba-130m", "gpt2", "opt-125m", "smollm2-135m"):
        report = analyze(load_config(name), seq_len=8, batch_size=1)
        assert report.unclassified == [], f"{name}: {report.unclassified}"
        assert report.device == "meta"


def test_find_decoder_layers_on_every_arch():
    expected = {"gpt_neox": "gpt_neox.layers", "mamba": "backbone.layers", "gpt2": "transformer.h",
                "llama": "model.layers", "opt": "model.decoder.layers"}
    for arch in ARCHS:
        path, layers = find_decoder_layers(tiny_model(arch))
        assert path == expected[arch] and len(layers) == 2


@pytest.mark.parametrize(
    "target, arguments, message",
    [
        (lambda: tiny_config("gpt2"), {"granularity": "layer"}, "unknown granularity"),
        (lambda: tiny_config("gpt2"), {"seq_len": 0}, "seq_len must be a positive integer"),
        (lambda: tiny_config("gpt2"), {"seq_len": 1000}, "exceeds the model's max_position_embeddings"),
        (lambda: ViTConfig(), {}, "ViTConfig \\(model_type 'vit'\\) is not a causal LM"),
        (lambda: GPTNeoXModel(tiny_config("gpt_neox")), {}, "GPTNeoXModel is not a causal LM"),
        (lambda: "pythia-70m", {}, "pass a transformers causal LM or its config"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(target, arguments, message):
    with pytest.raises(BWSKError, match=message) as error:
        analyze(target(), **arguments)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["gpt_neox", "mamba"])
def test_meta_shortcuts_leave_the_trace_unchanged(arch, monkeypatch):
    from hf_bwsk.analysis import meta_shortcuts, trace

    fast = analyze(tiny_config(arch), seq_len=17, batch_size=3)
    monkeypatch.setattr(meta_shortcuts.MetaPointwise, "applies", staticmethod(lambda args, kwargs: False))
    monkeypatch.setattr(trace, "matmul_applies", lambda func, args: False)
    slow = analyze(tiny_config(arch), seq_len=17, batch_size=3)
    assert slow.skipped == fast.skipped
    mismatches = [(a, b) for a, b in zip(fast.records, slow.records) if a != b]
    assert len(fast.records) == len(slow.records) and not mismatches, f"first mismatch: {mismatches[:1]}"

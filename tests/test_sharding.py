"""The tensor-parallel sharding plan along hidden, checked against Megatron-LM's placement."""

import pytest
from tiny_models import tiny_config, tiny_model

from hf_bwsk.analysis import calm_report

# Megatron-LM: the first linear of each block column-parallel, the last row-parallel.
MEGATRON = {
    "gpt2": {"attn.c_attn (addmm)": "column", "attn.c_proj (addmm)": "row",
             "mlp.c_fc (addmm)": "column", "mlp.c_proj (addmm)": "row"},
    "llama": {"self_attn.q_proj (mm)": "column", "self_attn.k_proj (mm)": "column", "self_attn.v_proj (mm)": "column",
              "self_attn.o_proj (mm)": "row", "mlp.gate_proj (mm)": "column", "mlp.up_proj (mm)": "column",
              "mlp.down_proj (mm)": "row"},
    "opt": {"self_attn.q_proj (addmm)": "column", "self_attn.k_proj (addmm)": "column",
            "self_attn.v_proj (addmm)": "column", "self_attn.out_proj (addmm)": "row",
            "fc1 (addmm)": "column", "fc2 (addmm)": "row"},
    "gpt_neox": {"attention.query_key_value (addmm)": "column", "attention.dense (addmm)": "row",
                 "mlp.dense_h_to_4h (addmm)": "column", "mlp.dense_4h_to_h (addmm)": "row"},
}


def plan_of(config):
    report = calm_report(config)
    return report, report.hidden_plan


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "gpt_neox"])
def test_transformer_layers_need_two_all_reduces_like_megatron(arch):
    config = tiny_config(arch)
    if arch == "gpt_neox":
        config.use_parallel_residual = False  # sequential residual, as in the other three
    report, plan = plan_of(config)
    assert len(plan.layers) == report.num_layers
    for layer in plan.layers:
        kinds = [item.kind for item in layer.collectives]
        assert kinds == ["all-reduce", "all-reduce"], f"{arch} layer {layer.layer}: {layer.collectives}"
        assert layer.linears == MEGATRON[arch], f"{arch} layer {layer.layer}: {layer.linears}"
    upper = report.axes["hidden"].layer_sync_counts
    assert all(upper[layer] > 2 for layer in upper), f"{arch}: the upper bound is a separate, larger figure {upper}"


def test_parallel_residual_needs_one_all_reduce_per_layer():
    # Attention and MLP both read the same replicated input, and their partial sums add up with
    # the residual before the next norm: one all-reduce (GPT-NeoX's own gpt_j_residual does this).
    report, plan = plan_of(tiny_config("gpt_neox"))
    assert report.hidden_plan.layer_collectives() == {0: 1, 1: 1}
    (reduce,) = plan.layers[0].collectives
    assert reduce.kind == "all-reduce" and reduce.op == "aten.add.Tensor"
    assert plan.layers[0].linears == MEGATRON["gpt_neox"]


def test_mamba_plan():
    report, plan = plan_of(tiny_config("mamba"))
    for layer in plan.layers:
        assert [item.kind for item in layer.collectives] == ["all-reduce", "all-reduce"], layer.collectives
        # x_proj (d_inner -> dt_rank + 2 state) is row-parallel: its small output is all-reduced once,
        # then dt_proj is column-parallel and the scan runs per channel shard.
        assert layer.collectives[0].path_in_layer == "mixer.x_proj"
        assert layer.linears["mixer.in_proj (mm)"] == "column" and layer.linears["mixer.out_proj (mm)"] == "row"


def test_real_model_plan_equals_the_config_plan():
    on_meta = calm_report(tiny_config("llama")).hidden_plan.to_dict()
    real = calm_report(tiny_model("llama")).hidden_plan.to_dict()
    assert on_meta["layer_collectives"] == real["layer_collectives"] == {0: 2, 1: 2}


def test_plan_in_table_and_json():
    report = calm_report(tiny_config("opt"))
    table = report.to_table()
    assert "tensor-parallel sharding plan (hidden axis): 2 collective(s) per layer" in table
    assert "upper bound" in table
    data = report.to_dict()["hidden_plan"]
    assert data["layer_collectives"] == {0: 2, 1: 2} and data["total_collectives"] == 5

"""The reversible mode: exact gradients, far fewer bytes kept for backward, a clean model afterwards."""

import warnings
from collections import Counter

import pytest
import torch
from grad_compare import assert_grads_close, assert_tensors_close
from tiny_models import ARCHS, tiny_batch, tiny_model
from transformers import AutoModelForCausalLM, CohereConfig

from hf_bwsk.analysis import find_decoder_layers
from hf_bwsk.analysis.records import OpRecord
from hf_bwsk.errors import BWSKError
from hf_bwsk.memory import ReversibleMode, bytes_kept_for_backward
from hf_bwsk.memory.checkpointing import checkpointing_enabled
from hf_bwsk.memory.layer_trace import trace_layers
from hf_bwsk.memory.plan import PER_STEP, OpKey, plan_recompute

# Mamba's reference scan runs one op group per token on CPU: its cases take ~8 s each.
ARCH_PARAMS = [pytest.param(arch, marks=pytest.mark.slow) if arch == "mamba" else arch for arch in ARCHS]


def reversible(model, batch, **kwargs):
    """`model` switched to the reversible mode, set up on `batch` (as BWSKTrainer does on step 1)."""
    mode = ReversibleMode(model, find_layers=find_decoder_layers, loss_chunk_size=24, **kwargs)
    mode.install_forward()
    mode.setup(batch)
    return mode


def padded_batch(seq_len):
    """Two rows, the second right-padded: masked positions and ignore_index labels."""
    batch = tiny_batch(2, seq_len, seed=3)
    batch["attention_mask"][1, -5:] = 0
    batch["labels"][1, -5:] = -100
    return batch


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_loss_and_every_gradient_equal_conventional(arch):
    conventional, model = tiny_model(arch), tiny_model(arch)
    conventional.train()
    model.train()
    batch = padded_batch(40)
    mode = reversible(model, batch)
    assert mode.status()["status"] == "active"
    for num_items_in_batch in (None, 50):  # plain mean, then HF's gradient-accumulation sum / N
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        for m in (conventional, model):
            m.zero_grad()
        torch.manual_seed(7)  # same dropout masks on both sides (GPT-2 has dropout 0.1)
        expected = conventional(**batch, **extra).loss
        expected.backward()
        torch.manual_seed(7)
        output = model(**batch, **extra)
        assert output.logits is None, "the fused loss must not materialise logits"
        output.loss.backward()
        assert_tensors_close(output.loss, expected, rtol=1e-5, atol=1e-6, name=f"{arch} loss")
        assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    mode.teardown()


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_bytes_kept_for_backward_at_most_035x(arch):
    # Sequence 128: long enough that the per-layer intermediates (4h-wide MLP activations, T x T
    # attention probabilities, the scan states) dominate, as they do at real scale, rather than
    # the fixed costs both modes share (layer inputs, the attention mask).
    batch = tiny_batch(2, 128, seed=1)
    conventional, model = tiny_model(arch), tiny_model(arch)
    conventional.train()
    model.train()
    mode = reversible(model, batch)
    kept_conventional = bytes_kept_for_backward(lambda: conventional(**batch).loss).activation_bytes
    kept_reversible = bytes_kept_for_backward(lambda: model(**batch).loss).activation_bytes
    mode.teardown()
    ratio = kept_reversible / kept_conventional
    assert ratio <= 0.35, f"{arch}: reversible keeps {kept_reversible:,} of {kept_conventional:,} bytes ({ratio:.3f}x)"


def test_plan_recomputes_the_widening_matmul_feeding_gelu_and_keeps_the_rest():
    model = tiny_model("gpt_neox")
    mode = reversible(model, tiny_batch(2, 64))
    recomputed = {(key.path, key.op) for key in mode.plan.recompute}
    kept = {(key.path, key.op) for key in mode.plan.keep}
    skipped = {(key.path, key.op) for key in mode.plan.skip}
    mode.teardown()
    assert ("mlp.dense_h_to_4h", "aten.addmm.default") in recomputed  # h -> 4h, feeds GELU (K)
    assert ("attention", "aten.bmm.default") in recomputed  # T x T scores feed softmax (K)
    assert ("attention.query_key_value", "aten.addmm.default") in kept
    # The two projections writing into the (parallel) residual stream: their outputs reach only the
    # layer's output, through views and additions, so backward never reads them.
    assert skipped == {("attention.dense", "aten.addmm.default"), ("mlp.dense_4h_to_h", "aten.addmm.default")}
    # The MLP's runs last: the checkpoint's recompute stops at its saved inputs, before it.
    assert {(key.path, key.op) for key in mode.plan.unreached} == {("mlp.dense_4h_to_h", "aten.addmm.default")}


@pytest.mark.slow
def test_mamba_plan_recomputes_the_narrow_scan_ops_and_keeps_the_width_contractions():
    # Tiny Mamba: width 32, state 8, conv kernel 4, dt rank 4. The conv, the dt projection and the
    # per-token state contractions spend fewer FLOPs per output element than the width: recomputed.
    model = tiny_model("mamba")
    mode = reversible(model, tiny_batch(2, 16))
    recomputed = {(key.path, key.op) for key in mode.plan.recompute}
    kept = {(key.path, key.op) for key in mode.plan.keep}
    summary = mode.plan.summary()
    mode.teardown()
    for narrow in ("aten.convolution.default", "aten.mm.default", "aten.bmm.default"):
        assert ("mixer", narrow) in recomputed
    assert not any(path == "mixer" for path, _ in kept), kept
    assert ("mixer.x_proj", "aten.mm.default") in kept
    assert {(key.path, key.op) for key in mode.plan.skip} == {("mixer.out_proj", "aten.mm.default")}  # into the residual
    assert mode.plan.unreached == mode.plan.skip  # and the layer's last op
    # The scan's per-token state contraction: its first step (from the zero state), then one op per loop.
    assert summary["recomputed_ops"]["mixer:aten.bmm.default per step"] == 2  # one loop per layer
    assert summary["recomputed_loop_steps"]["mixer:aten.bmm.default per step"] == 15


def test_plan_summary_groups_the_scan_loop_whatever_the_sequence_length():
    model = tiny_model("mamba")
    layers_path, layers = find_decoder_layers(model)
    summaries = {}
    for seq_len in (16, 40):
        trace = trace_layers(model, layers_path, layers, tiny_batch(2, seq_len))
        plan = plan_recompute(trace.records, trace.layer_input_bytes, batch_size=trace.batch_size,
                              hidden_size=trace.hidden_size)
        summaries[seq_len] = plan.summary()
        ungrouped = Counter((key.path, key.op) for key in plan.recompute)
        assert ungrouped["mixer", "aten.bmm.default"] > seq_len, "the plan itself still holds every step"
    short, long = summaries[16], summaries[40]
    assert short["recomputed_ops"] == long["recomputed_ops"], (short["recomputed_ops"], long["recomputed_ops"])
    assert any(name.endswith(PER_STEP) for name in short["recomputed_ops"])
    assert set(short["recomputed_loop_steps"].values()) == {15}
    assert set(long["recomputed_loop_steps"].values()) == {39}


def test_plan_summary_of_a_transformer_has_no_loops():
    model = tiny_model("gpt_neox")
    layers_path, layers = find_decoder_layers(model)
    trace = trace_layers(model, layers_path, layers, tiny_batch(2, 16))
    summary = plan_recompute(trace.records, trace.layer_input_bytes, hidden_size=trace.hidden_size).summary()
    assert summary["recomputed_loop_steps"] == {}
    assert not any(name.endswith(PER_STEP) for name in summary["recomputed_ops"])
    assert summary["recomputed_ops"]["mlp.dense_h_to_4h:aten.addmm.default"] == len(layers)


def test_default_plan_recomputes_ops_narrower_than_the_layer_width():
    # 1000 FLOPs over 100 bytes = 25 elements: 40 FLOPs per element. Width 64 (a projection of the
    # layer input costs 128 per element): narrow, recomputed. Width 32: kept. No width: kept.
    ops = [_op(0, flops=1000, output_bytes=100), _op(1, flops=100_000, output_bytes=100)]
    assert {key.path for key in plan_recompute(ops, [40], hidden_size=64).recompute} == {"m0"}
    assert not plan_recompute(ops, [40], hidden_size=32).recompute
    assert not plan_recompute(ops, [40]).recompute
    assert plan_recompute(ops, [40], hidden_size=64).kept_bytes == 140


def test_teardown_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    keys_before = list(model.state_dict())
    mode = reversible(model, tiny_batch(2, 16))
    assert checkpointing_enabled(model)
    mode.teardown()
    assert "forward" not in model.__dict__
    assert not checkpointing_enabled(model)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert list(model.state_dict()) == keys_before


def _op(index, flops, output_bytes, widening=False, layer=0):
    return OpRecord(index, "aten.mm.default", f"layers.{layer}.m{index}", "Linear", layer, ((output_bytes // 4,),),
                    ((output_bytes // 4,),), output_bytes, flops, "S", "", True, frozenset(), f"m{index}",
                    activation_input_numel=output_bytes // (8 if widening else 4))


def _flow(index, op, producers, layer=0, relabels=False, flops=0):
    """A record of op ``op`` reading ``producers``' outputs, in ``layer``, at path ``m<index>``."""
    return OpRecord(index, op, f"layers.{layer}.m{index}", "M", layer, ((4, 8),), ((4, 8),), 128, flops, "S", "",
                    True, frozenset(), f"m{index}", producers=producers, activation_input_numel=32, relabels=relabels)


@pytest.mark.parametrize("tail, skipped", [
    # Through a view and two residual additions into the layer's output: backward never reads it.
    ([("aten.view.default", True), ("aten.add.Tensor", False), ("aten.add.Tensor", False)], True),
    # Into a norm (a sequential residual's next block): the norm's backward reads its input.
    ([("aten.add.Tensor", False), ("aten.native_layer_norm.default", False)], False),
    # Through dropout's mask multiplication, whose backward reads the mask, built in the recompute.
    ([("aten.mul.Tensor", False), ("aten.add.Tensor", False)], False),
    # The layer's output itself, or data flow never recorded: nothing proves it unread.
    ([], False),
])
def test_a_matmul_is_skipped_only_when_its_output_flows_unread_into_the_layer_output(tail, skipped):
    records = [_flow(0, "aten.mm.default", (), flops=512)]
    for index, (op, relabels) in enumerate(tail, start=1):
        records.append(_flow(index, op, (index - 1,), relabels=relabels))
    plan = plan_recompute(records, [64])
    key = OpKey(0, "m0", "aten.mm.default", 0)
    assert (key in plan.skip) == skipped and (key in plan.keep) != skipped, plan
    assert plan.skipped_bytes == (128 if skipped else 0) and plan.kept_bytes == 64 + (0 if skipped else 128)
    assert plan.summary()["skipped_ops"] == ({"m0:aten.mm.default": 1} if skipped else {})
    unskipped = plan_recompute(records, [64], skip_unread=False)
    assert not unskipped.skip and key in unskipped.keep, "an execution that cannot skip keeps it"


@pytest.mark.parametrize("after, unreached", [
    ([], True),  # the layer's last op
    ([("aten.view.default", True, True), ("aten.add.Tensor", False, True)], True),  # then only ops saving nothing
    # A norm of the layer input after it saves its input: the recompute runs on to it, through m2.
    ([("aten.native_layer_norm.default", False, False)], False),
])
def test_the_last_matmul_a_layer_saves_for_is_never_reached_by_the_recompute(after, unreached):
    # m0's output flows unread into the layer output (skipped); m1 reads the layer input; then `after`.
    # The checkpoint's recompute stops at the last saved tensor: a last matmul's inputs, saved before it runs.
    records = [_flow(0, "aten.mm.default", (), flops=512), _flow(1, "aten.add.Tensor", (0,)),
               _flow(2, "aten.mm.default", (), flops=512), _flow(3, "aten.add.Tensor", (1, 2))]
    for index, (op, relabels, chained) in enumerate(after, start=4):
        records.append(_flow(index, op, (index - 1,) if chained else (), relabels=relabels))
    plan = plan_recompute(records, [64])
    first, last = OpKey(0, "m0", "aten.mm.default", 0), OpKey(0, "m2", "aten.mm.default", 0)
    assert first in plan.skip and first not in plan.unreached, "m1 saves after it: the recompute reaches m0"
    assert last in plan.skip and (last in plan.unreached) == unreached and plan.unreached <= plan.skip, plan
    assert not plan_recompute(records, [64], skip_unread=False).unreached, "unreached ones are skipped ones"


def test_the_next_layer_reading_a_layer_output_does_not_make_it_read():
    # Layer 0's matmul flows through an addition into layer 1's norm: another checkpoint, whose own
    # recompute starts from its kept input; within layer 0 the value still flows out unread.
    records = [_flow(0, "aten.mm.default", (), flops=512), _flow(1, "aten.add.Tensor", (0,)),
               _flow(2, "aten.native_layer_norm.default", (1,), layer=1)]
    assert OpKey(0, "m0", "aten.mm.default", 0) in plan_recompute(records, [64, 64]).skip


def test_budget_keeps_most_flops_per_byte_and_states_the_minimum():
    ops = [_op(0, flops=1000, output_bytes=100), _op(1, flops=100, output_bytes=100), _op(2, flops=900, output_bytes=50)]
    plan = plan_recompute(ops, [40], budget_bytes=200)
    # Densities: op2 18/B, op0 10/B, op1 1/B. 40 (inputs) + 50 + 100 fits 200; op1 does not.
    assert {key.path for key in plan.keep} == {"m0", "m2"}
    assert {key.path for key in plan.recompute} == {"m1"}
    assert plan.kept_bytes == 190 and plan.minimum_bytes == 40
    assert not plan.keeps(OpKey(0, "unseen", "aten.mm.default", 0), expensive=True)
    with pytest.raises(BWSKError, match="below the minimum 40 bytes"):
        plan_recompute(ops, [40], budget_bytes=39)


def test_budget_keeps_the_later_layer_of_two_equally_worth_outputs():
    # Same FLOPs per byte in both layers; room for one: the last layer's, alive at its own backward anyway.
    ops = [_op(0, flops=1000, output_bytes=100), _op(1, flops=1000, output_bytes=100, layer=1)]
    plan = plan_recompute(ops, [40, 40], budget_bytes=190)
    assert {(key.layer, key.path) for key in plan.keep} == {(1, "m1")}, plan.keep
    assert {(key.layer, key.path) for key in plan.recompute} == {(0, "m0")}


def test_budget_below_minimum_fails_before_training():
    model = tiny_model("gpt_neox")
    with pytest.raises(BWSKError, match=r"below the minimum whole-step peak .* raise it to at least 1MiB"):
        reversible(model, tiny_batch(2, 32), memory_budget_bytes=1000)  # weights + AdamW state alone: ~0.5 MB


def test_logit_scaling_model_keeps_its_own_loss_with_one_warning_and_exact_gradients():
    # Cohere scales its logits: the fused loss on the plain head would be wrong, so the mode keeps the
    # model's loss (decided at construction, without a batch) and applies only the layer policy.
    config = CohereConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, logit_scale=0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    torch.manual_seed(0)
    conventional = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    batch = tiny_batch(2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mode = ReversibleMode(model, loss_chunk_size=24)
    own_loss_warnings = [w for w in caught if "own loss" in str(w.message)]
    assert len(own_loss_warnings) == 1, [str(w.message) for w in caught]
    mode.install_forward()
    mode.setup(batch)
    status = mode.status()
    assert status["status"] == "active" and status["loss"] == "model" and "logit" in status["loss_reason"]
    assert checkpointing_enabled(model)
    model(**batch).loss.backward()
    conventional(**batch).loss.backward()
    assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    mode.teardown()

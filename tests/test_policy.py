"""Plan fidelity: the run-time policy applies the plan it was given, counts what it could not, and says so."""

import dataclasses
import types
import warnings

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy
from grad_compare import assert_grads_close, assert_tensors_close
from tiny_models import tiny_batch, tiny_model

from hf_bwsk.analysis import find_decoder_layers
from hf_bwsk.analysis.records import OpRecord
from hf_bwsk.memory import ReversibleMode
from hf_bwsk.memory.plan import OpKey, known_cheap, plan_recompute
from hf_bwsk.memory.policy import SKIP, LayerPathTracker, SelectivePolicy


def reversible(model, batch, execution="auto"):
    mode = ReversibleMode(model, find_layers=find_decoder_layers, loss_chunk_size=24, execution=execution)
    mode.install_forward()
    mode.setup(batch)
    return mode


def visible_plan(mode) -> dict:
    """The plan's decisions the run-time policy sees: all of them per-op, those inside scopes when scoped."""
    plan = mode.plan
    planned = {**dict.fromkeys(plan.recompute, False), **dict.fromkeys(plan.keep, True), **dict.fromkeys(plan.skip, SKIP)}
    if mode.status()["execution"] == "scoped":
        # An unreached op needs no scope: the recompute stops before it.
        assert all(mode.policy.visible(key) for key in plan.keep | plan.skip - plan.unreached), \
            "every kept or skipped op the recompute reaches runs in a scope"
        planned = {key: keep for key, keep in planned.items() if mode.policy.visible(key)}
    return planned


def record(index, op, flops=0, output_shape=(1, 8, 32), layer=0, data_path=True, producers=(), kind="Gray"):
    numel = 1
    for size in output_shape:
        numel *= size
    return OpRecord(
        index=index, op=op, module_path=f"layers.{layer}.block", module_class="Block", layer=layer,
        input_shapes=((1, 8, 32),), output_shapes=(output_shape,), output_bytes=4 * numel, flops=flops,
        kind=kind, reason="", data_path=data_path, mixes=frozenset(), path_in_layer="block",
        producers=producers, activation_input_numel=8 * 32,
    )


@pytest.mark.parametrize("execution", ["scoped", "per_op"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_run_time_decisions_are_the_plans_and_every_planned_op_is_hit(arch, execution):
    model = tiny_model(arch)
    model.train()
    batch = tiny_batch(2, 24)
    mode = reversible(model, batch, execution)
    assert mode.status()["execution"] == execution
    mode.policy.decisions = {}
    model(**batch).loss.backward()
    decisions = mode.policy.decisions
    planned = visible_plan(mode)
    assert planned, "the plan holds no decisions to check"
    run_time = {key: keep for key, keep in decisions.items() if key in planned}
    assert run_time == planned, f"run-time decisions differ from the plan: {set(run_time.items()) ^ set(planned.items())}"
    # Every other op the layers ran is known cheap and recomputed: no miss, nothing unplanned kept.
    unplanned = {key: keep for key, keep in decisions.items() if key not in planned}
    assert not any(unplanned.values()), f"unplanned ops kept: {[k for k, v in unplanned.items() if v]}"
    assert all(known_cheap(key.op) for key in unplanned), [k.op for k in unplanned if not known_cheap(k.op)]
    fidelity = mode.status()["plan_fidelity"]
    assert fidelity["plan_hits"] == len(planned) and fidelity["plan_misses"] == 0
    assert fidelity["cheap_by_rule"] == len(unplanned)
    mode.teardown()


@pytest.mark.parametrize("execution", ["scoped", "per_op"])
def test_batches_of_varying_length_keep_hitting_the_plan_with_exact_gradients(execution):
    # Dynamic padding: every batch has its own length; the plan, traced on the first, must still apply.
    conventional, model = tiny_model("gpt_neox"), tiny_model("gpt_neox")
    conventional.train()
    model.train()
    batches = [tiny_batch(2, seq_len, seed=seq_len) for seq_len in (24, 9, 40, 17)]
    batches[2]["attention_mask"][1, -11:] = 0
    batches[2]["labels"][1, -11:] = -100
    mode = reversible(model, batches[0], execution)
    hits_per_batch = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a miss would warn
        for batch in batches:
            for m in (model, conventional):
                m.zero_grad()
            hits_before = mode.policy.fidelity["plan_hits"]
            loss = model(**batch).loss
            loss.backward()
            expected = conventional(**batch).loss
            expected.backward()
            assert_tensors_close(loss, expected, rtol=1e-5, atol=1e-6, name=f"loss at length {batch['input_ids'].shape[1]}")
            assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
            hits_per_batch.append(mode.policy.fidelity["plan_hits"] - hits_before)
    planned = len(visible_plan(mode))
    assert hits_per_batch == [planned] * len(batches), f"plan hits per batch {hits_per_batch}, plan size {planned}"
    assert mode.policy.fidelity["plan_misses"] == 0
    mode.teardown()


def drop_layer_from_plan(mode, layer: int):
    """Give the running policy the plan without ``layer``'s keys; returns the full plan."""
    plan = mode.plan
    mode.policy.plan = dataclasses.replace(plan, keep=frozenset(k for k in plan.keep if k.layer != layer),
                                           recompute=frozenset(k for k in plan.recompute if k.layer != layer))
    return plan


def test_an_op_the_plan_never_saw_is_counted_and_warned_about_once():
    model = tiny_model("gpt_neox")
    model.train()
    batch = tiny_batch(2, 16)
    mode = reversible(model, batch, "per_op")
    # A plan that lost one layer's keys: that layer's expensive ops all miss.
    plan = drop_layer_from_plan(mode, 1)
    lost = len(plan.keep | plan.recompute) - len(mode.policy.plan.keep | mode.policy.plan.recompute)
    with pytest.warns(UserWarning, match="not in the recompute plan") as caught:
        model(**batch).loss.backward()
        model(**batch).loss.backward()
    assert sum("not in the recompute plan" in str(w.message) for w in caught) == 1, "warn once, not per op"
    fidelity = mode.status()["plan_fidelity"]
    assert fidelity["plan_misses"] == 2 * lost and fidelity["first_misses"][0].startswith("1:")
    mode.teardown()


def test_scoped_counts_unplanned_ops_in_scopes_and_kept_ops_that_did_not_run():
    model = tiny_model("gpt_neox")
    model.train()
    batch = tiny_batch(2, 16)
    mode = reversible(model, batch, "scoped")
    # Layer 1's keys lost: its ops in scopes are unplanned expensive ops, kept by rule and counted as misses.
    plan = drop_layer_from_plan(mode, 1)
    lost = sum(1 for key in plan.keep | plan.recompute if key.layer == 1 and mode.policy.visible(key))
    with pytest.warns(UserWarning, match="not in the recompute plan") as caught:
        model(**batch).loss.backward()
        model(**batch).loss.backward()
    assert sum("not in the recompute plan" in str(w.message) for w in caught) == 1, "warn once, not per op"
    fidelity = mode.status()["plan_fidelity"]
    assert lost and fidelity["plan_misses"] == 2 * lost and fidelity["first_misses"][0].startswith("1:")
    # A kept op of layer 0 that the forward never runs (a later occurrence in a scope): a miss per forward.
    ghost = OpKey(0, "attention", "aten.bmm.default", 7)
    assert mode.policy.visible(ghost)
    mode.policy.plan = dataclasses.replace(plan, keep=plan.keep | {ghost})
    with pytest.warns(UserWarning, match="did not run in its forward"):
        model(**batch).loss.backward()
    assert mode.status()["plan_fidelity"]["plan_misses"] == 2 * lost + 1
    mode.teardown()


def test_a_layer_without_its_index_warns_that_every_op_misses():
    model = tiny_model("gpt_neox")
    layers_path, layers = find_decoder_layers(model)
    tracker = LayerPathTracker(layers)
    plan = plan_recompute([], [0, 0])
    policy = SelectivePolicy(plan, tracker).layer_policy()
    forward = types.SimpleNamespace(is_recompute=False)
    with pytest.warns(UserWarning, match="no layer index"):
        policy(forward, torch.ops.aten.mm.default)  # an op run while no layer's pre-hook has run
    tracker.remove()


def _layer_call(plan, tracker):
    """One layer call's policy and a caller of it: ``ask(recompute, layer, path, op)``."""
    policy = SelectivePolicy(plan, tracker).layer_policy()

    def ask(recompute: bool, layer, path: str, op):
        tracker.layer, tracker._stack[:] = layer, [path] if path else []
        return policy(types.SimpleNamespace(is_recompute=recompute), op)

    return ask


@pytest.mark.parametrize("hooks_in_recompute", [False, True], ids=["forward_checkpointed", "call_checkpointed"])
def test_a_recompute_that_asks_again_gets_the_forward_s_decisions_in_call_order(hooks_in_recompute):
    # torch 2.11 asks the policy again while recomputing. transformers 5.23+ checkpoints a layer's forward:
    # its recompute runs without the layer's hooks (no layer index). 5.17 checkpoints __call__: the hooks
    # run inside, and a wrapper's hooks (FSDP2's unshard) run before the layer's own, in the forward only.
    model = tiny_model("gpt_neox")
    _, layers = find_decoder_layers(model)
    tracker = LayerPathTracker(layers)
    kept = OpKey(1, "attention.dense", "aten.addmm.default", 0)
    recomputed = OpKey(1, "attention.dense", "aten.addmm.default", 1)
    plan = dataclasses.replace(plan_recompute([], [0, 0]), keep=frozenset({kept}), recompute=frozenset({recomputed}))
    ask = _layer_call(plan, tracker)
    addmm, copy = torch.ops.aten.addmm.default, torch.ops.aten.copy_.default
    save, again = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    if hooks_in_recompute:  # a wrapper's op before the layer's pre-hook, of an overload the layer keeps
        with pytest.warns(UserWarning, match="no layer index"):
            assert ask(False, None, "", addmm) == again
    forward = [ask(False, 1, "attention.dense", addmm), ask(False, 1, "attention.dense", addmm)]
    layer = 1 if hooks_in_recompute else None
    recompute = [ask(True, layer, "attention.dense", addmm), ask(True, layer, "attention.dense", addmm)]
    assert forward == recompute == [save, again], (forward, recompute)
    if hooks_in_recompute:  # the wrapper's op again, after the layer: recomputed, and it shifts no index
        assert ask(True, None, "", copy) == again
    tracker.remove()


def test_unknown_ops_on_the_data_path_are_kept_and_known_cheap_ones_recomputed():
    # A custom kernel (no FLOP formula, no S/K rule) that widens into a K op: the shape the default
    # plan recomputes when it can cost the op, kept here because it cannot.
    records = [
        record(0, "aten.mm.default", flops=2 * 8 * 32 * 32),
        record(1, "flash_attn._flash_attn_forward.default", output_shape=(1, 8, 128), producers=(0,)),
        record(2, "aten.add.Tensor", output_shape=(1, 8, 128), producers=(1,), kind="S"),
        record(3, "aten.gelu.default", output_shape=(1, 8, 128), producers=(2,), kind="K"),
        record(4, "mylib.mask_builder.default", data_path=False),
    ]
    plan = plan_recompute(records, [1024], hidden_size=32)
    assert OpKey(0, "block", "flash_attn._flash_attn_forward.default", 0) in plan.keep
    kept_ops = {key.op for key in plan.keep}
    assert "aten.add.Tensor" not in kept_ops and "aten.gelu.default" not in kept_ops
    assert "mylib.mask_builder.default" not in kept_ops, "auxiliary (off the data path) ops stay cheap"
    assert known_cheap("aten.add.Tensor") and known_cheap("aten._softmax.default")
    assert not known_cheap("aten.mm.default") and not known_cheap("aten._scaled_dot_product_flash_attention_for_cpu.default")
    assert not known_cheap("flash_attn._flash_attn_forward.default") and not known_cheap("aten.no_such_op.default")
    assert known_cheap("profiler._record_function_enter_new.default")
    # At run time, an unseen custom op counts as expensive: the default plan keeps it.
    assert plan.keeps(OpKey(1, "block", "flash_attn._flash_attn_forward.default", 0), expensive=not known_cheap(
        "flash_attn._flash_attn_forward.default"))


def test_status_counts_reach_the_results_file(tmp_path):
    import json

    from test_trainer import train

    trainer, _ = train("gpt_neox", tmp_path, mode="reversible", steps=2)
    results = json.loads((tmp_path / "training_results.json").read_text())
    fidelity = results["reversible"]["plan_fidelity"]
    planned = len(visible_plan(trainer.reversible_mode))
    assert results["reversible"]["execution"] == "scoped"
    assert fidelity["plan_hits"] == 2 * planned and fidelity["plan_misses"] == 0, fidelity
    assert torch.isfinite(torch.tensor(results["final_train_loss"]))

"""The reversible mode outside BWSKTrainer: the public handle, PEFT models, and the drop-in promises."""

import warnings

import pytest
import torch
from grad_compare import assert_grads_close, assert_tensors_close
from peft import LoraConfig, get_peft_model
from test_trainer import dataset, train
from tiny_models import tiny_batch, tiny_model
from transformers import Trainer

import hf_bwsk
from hf_bwsk.errors import BWSKError
from hf_bwsk.memory import bytes_kept_for_backward, count_train_flops
from hf_bwsk.memory.checkpointing import checkpointing_enabled, enable_checkpointing
from hf_bwsk.training.args import BWSKTrainingArguments
from hf_bwsk.training.callback import BWSKCallback
from hf_bwsk.training.trainer import BWSKTrainer

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lora_model(seed=0):
    """A tiny Llama with LoRA adapters whose B matrices are non-zero, so every adapter gets a gradient."""
    model = get_peft_model(tiny_model("llama", seed=seed), LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def test_apply_reversible_plans_on_the_first_forward_and_remove_restores():
    model, conventional = tiny_model("gpt_neox").train(), tiny_model("gpt_neox").train()
    batch = tiny_batch(2, 32)
    handle = hf_bwsk.apply_reversible(model, memory_budget="1MB", loss_chunk_size=16)
    assert handle.status()["status"] == "pending" and not checkpointing_enabled(model)
    loss = model(**batch).loss
    status = handle.status()
    assert status["status"] == "active" and status["loss"] == "fused_linear_cross_entropy"
    assert status["peak_budget_bytes"] == 10**6 and status["plan"]["policy"] == "budget" and checkpointing_enabled(model)
    loss.backward()
    expected = conventional(**batch).loss
    expected.backward()
    assert_tensors_close(loss, expected, rtol=1e-5, atol=1e-6, name="loss")
    assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert "forward" not in model.__dict__ and not checkpointing_enabled(model)
    assert model(**batch).logits is not None


@pytest.mark.parametrize("piece", ["fused_loss_alone", "layer_policy_alone"])
def test_each_piece_applies_alone_at_equal_gradients(piece):
    model, conventional = tiny_model("llama").train(), tiny_model("llama").train()
    batch = tiny_batch(2, 32)
    options = {"layer_policy": False} if piece == "fused_loss_alone" else {"loss": "model"}
    handle = hf_bwsk.apply_reversible(model, loss_chunk_size=16, **options)
    output = model(**batch)
    output.loss.backward()
    expected = conventional(**batch).loss
    expected.backward()
    assert_tensors_close(output.loss, expected, rtol=1e-5, atol=1e-6, name=piece)
    assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    status = handle.status()
    if piece == "fused_loss_alone":
        assert output.logits is None and status["plan"] is None and not checkpointing_enabled(model)
    else:
        assert output.logits is not None and status["loss"] == "model" and status["plan"]["recomputed_ops"]
        assert checkpointing_enabled(model)
    handle.remove()


def test_apply_reversible_refuses_bad_input_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(BWSKError, match="choose one of fused, model"):
        hf_bwsk.apply_reversible(model, loss="chunked")
    with pytest.raises(BWSKError, match="byte size"):
        hf_bwsk.apply_reversible(model, memory_budget="lots")
    with pytest.raises(BWSKError, match="nothing to apply"):
        hf_bwsk.apply_reversible(model, loss="model", layer_policy=False)
    with pytest.raises(BWSKError, match="no output head"):
        hf_bwsk.apply_reversible(model.model)  # the bare LlamaModel: not a causal LM
    assert "forward" not in model.__dict__


def test_activation_checkpointing_argument_is_replaced_with_one_notice(tmp_path):
    # transformers 5.17 has only the older name of the argument.
    fields = BWSKTrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    with pytest.warns(UserWarning, match="replaces activation_checkpointing=True") as caught:
        args = BWSKTrainingArguments(output_dir=str(tmp_path), bwsk_mode="reversible", use_cpu=True, report_to=[],
                                     **{name: True})
    assert len([w for w in caught if "replaces" in str(w.message)]) == 1
    assert not getattr(args, name) and not args.gradient_checkpointing


def test_checkpointing_already_on_is_replaced_with_one_notice():
    model = tiny_model("llama").train()
    enable_checkpointing(model, {"use_reentrant": False})
    handle = hf_bwsk.apply_reversible(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**tiny_batch(2, 16)).loss.backward()
    notices = [w for w in caught if "replaces the activation checkpointing" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    assert handle.status()["status"] == "active"
    handle.remove()


def test_peft_lora_gradients_equal_conventional_lora_and_lora_ops_are_planned():
    model, conventional = lora_model(), lora_model()
    batch = tiny_batch(2, 24)
    handle = hf_bwsk.apply_reversible(model, loss_chunk_size=16)
    loss = model(**batch).loss
    loss.backward()
    expected = conventional(**batch).loss
    expected.backward()
    assert_tensors_close(loss, expected, rtol=1e-5, atol=1e-6, name="LoRA loss")
    assert_grads_close(model, conventional, rtol=1e-5, atol=1e-6)
    trained = [name for name, param in model.named_parameters() if param.grad is not None]
    assert trained and all("lora_" in name for name in trained), trained
    planned = {key.path for key in handle.plan.keep | handle.plan.recompute}
    for target in LORA_TARGETS:
        assert any(target in path and "lora_B" in path for path in planned), (target, sorted(planned))
    # LoRA's B matmul contracts over the rank (4 < width 32): narrow, so recomputed, never kept.
    assert all("lora_B" not in key.path for key in handle.plan.keep)
    # The adapted down projection's base matmul flows, through LoRA's addition, into the residual: skipped.
    assert {key.path for key in handle.plan.skip} == {"mlp.down_proj.base_layer"}, handle.plan.skip
    handle.remove()
    assert "forward" not in model.get_base_model().__dict__


def test_peft_lora_reversible_keeps_fewer_bytes_at_few_more_flops():
    batch = tiny_batch(2, 128, seed=1)
    conventional, model = lora_model(), lora_model()
    handle = hf_bwsk.apply_reversible(model)
    model(**tiny_batch(2, 128, seed=2)).loss  # plans on a first batch
    kept = {name: bytes_kept_for_backward(lambda m=m: m(**batch).loss).activation_bytes
            for name, m in (("conventional", conventional), ("reversible", model))}
    flops = {name: count_train_flops(lambda m=m: m(**batch).loss.backward())
             for name, m in (("conventional", conventional), ("reversible", model))}
    handle.remove()
    ratio = kept["reversible"] / kept["conventional"]
    assert ratio <= 0.5, f"LoRA reversible keeps {kept['reversible']:,} of {kept['conventional']:,} bytes ({ratio:.3f}x)"
    assert flops["reversible"] <= 1.25 * flops["conventional"], flops


@pytest.mark.parametrize("mode", ["analyzed", "reversible"])
def test_bwsk_trainer_trains_a_peft_model_and_saves_only_the_adapter(tmp_path, mode):
    args = BWSKTrainingArguments(output_dir=str(tmp_path), bwsk_mode=mode, max_steps=4, per_device_train_batch_size=2,
                                 logging_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, bwsk_analysis_seq_len=8, seed=0)
    model = lora_model()
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    trainer = BWSKTrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0], losses
    unchanged = [name for name, param in model.named_parameters() if name in before and torch.equal(param, before[name])]
    assert not unchanged, unchanged
    trainer.save_model(str(tmp_path / "saved"))
    saved = sorted(path.name for path in (tmp_path / "saved").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved, saved
    if mode == "reversible":
        assert trainer.reversible_mode.status()["loss"] == "fused_linear_cross_entropy"


def test_conventional_mode_adds_no_callback_and_no_log_entry(tmp_path):
    stock, _ = train("gpt_neox", tmp_path / "stock", steps=2)
    ours, _ = train("gpt_neox", tmp_path / "ours", mode="conventional", steps=2)
    assert [type(cb) for cb in ours.callback_handler.callbacks] == [type(cb) for cb in stock.callback_handler.callbacks]
    assert [log.keys() for log in ours.state.log_history] == [log.keys() for log in stock.state.log_history]
    asked = BWSKCallback()
    args = BWSKTrainingArguments(output_dir=str(tmp_path / "asked"), max_steps=1, report_to=[], use_cpu=True)
    trainer = BWSKTrainer(model=tiny_model("gpt_neox"), args=args, train_dataset=dataset(), callbacks=[asked])
    assert trainer.bwsk_callback is asked


@pytest.mark.parametrize("mode", ["analyzed", "reversible"])
def test_bwsk_metrics_join_the_training_log_entries(tmp_path, mode):
    trainer, _ = train("llama", tmp_path, mode=mode, steps=2)
    training_logs = [log for log in trainer.state.log_history if "loss" in log or "train_loss" in log]
    assert len(training_logs) == len(trainer.state.log_history), "a log entry without the loss"
    assert "bwsk/s_ratio" in training_logs[0]
    assert ("bwsk/recompute_flops_fraction" in training_logs[0]) == (mode == "reversible")


@pytest.mark.parametrize("mode", ["analyzed", "reversible"])
def test_unsupported_model_is_rejected_at_construction(tmp_path, mode):
    args = BWSKTrainingArguments(output_dir=str(tmp_path), bwsk_mode=mode, report_to=[], use_cpu=True)
    model = tiny_model("gpt2")
    model.transformer.h = torch.nn.ModuleList([torch.nn.Linear(32, 32), torch.nn.ReLU()])  # no decoder layers
    with pytest.raises(BWSKError, match="decoder layers"):
        BWSKTrainer(model=model, args=args, train_dataset=dataset())


def test_mixin_brings_the_mode_to_another_trainer_subclass(tmp_path):
    class LoggingTrainer(hf_bwsk.BWSKMixin, Trainer):
        pass

    args = BWSKTrainingArguments(output_dir=str(tmp_path), bwsk_mode="reversible", max_steps=2,
                                 per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                                 bwsk_analysis_seq_len=8, disable_tqdm=True)
    trainer = LoggingTrainer(model=tiny_model("opt"), args=args, train_dataset=dataset())
    trainer.train()
    assert trainer.reversible_mode.status()["status"] == "active"
    assert (tmp_path / "training_results.json").exists()


@pytest.mark.slow
def test_reversible_under_torch_compile_follows_conventional(tmp_path):
    # The first training forward plans inside the compiled forward: the planning runs eagerly (the
    # compiler skips it) and the steps after it compile with the layer policy on.
    _, conventional = train("gpt_neox", tmp_path / "conventional", mode="conventional", steps=3, torch_compile=True)
    trainer, reversible = train("gpt_neox", tmp_path / "reversible", mode="reversible", steps=3, torch_compile=True)
    assert trainer.reversible_mode.status()["status"] == "active"
    torch.testing.assert_close(torch.tensor(reversible), torch.tensor(conventional), rtol=1e-5, atol=1e-6)

"""TRL's SFTTrainer with the reversible mode (BWSKMixin): TRL's loss path and metrics kept, layer policy on."""

import warnings
from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from tiny_models import VOCAB, tiny_model
from trl import SFTConfig, SFTTrainer

from hf_bwsk import BWSKMixin, BWSKTrainingArguments
from hf_bwsk.experiments.tokenization import train_bpe_tokenizer
from hf_bwsk.memory.checkpointing import checkpointing_enabled


@dataclass
class BWSKSFTConfig(SFTConfig, BWSKTrainingArguments):
    """SFT's arguments plus the bwsk ones, as one dataclass (HfArgumentParser reads both)."""


class BWSKSFTTrainer(BWSKMixin, SFTTrainer):
    """TRL's SFTTrainer with the BWSK modes."""


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(50)]
    return train_bpe_tokenizer(texts, VOCAB, model_max_length=64)


def sft_dataset(count=16, seq_len=16):
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"input_ids": torch.randint(0, VOCAB, (seq_len,), generator=generator).tolist()}
                              for _ in range(count)])


def sft_train(tmp_path, tokenizer, mode, **overrides):
    args = BWSKSFTConfig(output_dir=str(tmp_path), bwsk_mode=mode, max_steps=6, per_device_train_batch_size=2,
                         logging_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                         disable_tqdm=True, bwsk_analysis_seq_len=8, seed=0, max_length=16, **overrides)
    model = tiny_model("llama")
    trainer = BWSKSFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tokenizer)
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.slow
def test_sft_reversible_keeps_trl_loss_and_metrics_and_follows_sft(tmp_path, tokenizer):
    _, plain = sft_train(tmp_path / "plain", tokenizer, "conventional", gradient_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, logs = sft_train(tmp_path / "reversible", tokenizer, "reversible")  # SFT's default: checkpointing on
    notices = [w for w in caught if "replaces activation_checkpointing=True" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    status = trainer.reversible_mode.status()
    assert status["status"] == "active" and status["loss"] == "model", status
    assert status["plan"]["recomputed_ops"], "the layer policy recomputes nothing"
    for log in logs:  # TRL's own metrics, from its fused head, are all there
        assert {"entropy", "mean_token_accuracy", "num_tokens"} <= log.keys(), log.keys()
    assert "bwsk/recompute_flops_fraction" in logs[0] and logs[0]["bwsk/fused_loss"] == 0.0
    losses, expected = [log["loss"] for log in logs], [log["loss"] for log in plain]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0], losses
    untrained = tiny_model("llama")
    unchanged = [name for name, param in trainer.model.named_parameters()
                 if torch.equal(param, untrained.get_parameter(name))]
    assert not unchanged, unchanged
    # Handed back with TRL's forward (its fused head still answers) and without checkpointing.
    assert not checkpointing_enabled(trainer.model)
    input_ids = torch.tensor([sft_dataset()[0]["input_ids"]])
    fused = trainer.model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    assert fused.log_probs is not None and trainer.model(input_ids=input_ids).logits is not None


@pytest.mark.slow
def test_sft_with_peft_config_reversible_follows_sft_and_saves_the_adapter(tmp_path, tokenizer):
    from peft import LoraConfig

    def run(mode):
        args = BWSKSFTConfig(output_dir=str(tmp_path / mode), bwsk_mode=mode, max_steps=4,
                             per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, bwsk_analysis_seq_len=8, seed=0,
                             max_length=16, gradient_checkpointing=False)
        trainer = BWSKSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=sft_dataset(),
                                 processing_class=tokenizer,
                                 peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        trainer.train()
        trainer.save_model(str(tmp_path / mode / "saved"))
        return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    _, expected = run("conventional")
    trainer, losses = run("reversible")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    recomputed = trainer.reversible_mode.status()["plan"]["recomputed_ops"]
    assert any("lora_B" in op for op in recomputed), recomputed
    saved = sorted(path.name for path in (tmp_path / "reversible" / "saved").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved, saved

"""BWSKCallback's training_results.json: every field of docs/RESULTS_FORMAT.md, for Trainer and BWSKTrainer."""

import json
import math
import re
from pathlib import Path

from tiny_models import tiny_batch, tiny_model
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import TrainerState

from hf_bwsk.layout import TRAINING_RESULTS
from hf_bwsk.training.args import BWSKTrainingArguments
from hf_bwsk.training.callback import BWSKCallback
from hf_bwsk.training.trainer import BWSKTrainer

FORMAT = Path(__file__).parent.parent / "docs" / "RESULTS_FORMAT.md"


def documented_fields():
    """Field names of the training_results.json table in docs/RESULTS_FORMAT.md."""
    section = FORMAT.read_text().split("## `training_results.json`")[1].split("\n## ")[0]
    return {name for row in re.findall(r"^\| (.+?) \|", section, re.M) for name in re.findall(r"`(\w+)`", row)}


def dataset(count, seq_len=20):
    return [{key: value[0] for key, value in tiny_batch(1, seq_len, seed=i).items()} for i in range(count)]


def settings(output_dir):
    return dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
                eval_strategy="steps", eval_steps=2, learning_rate=3e-3, seed=5, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True)


def check_record(record, steps):
    missing = documented_fields() - record.keys()
    assert not missing, f"training_results.json lacks {sorted(missing)}"
    assert record["total_steps"] == steps and len(record["loss_curve"]) == steps
    assert record["final_train_loss"] == record["loss_curve"][-1]["loss"]
    assert [entry["step"] for entry in record["val_curve"]] == [2, 4]
    best = min(entry["loss"] for entry in record["val_curve"])
    assert record["best_val_loss"] == best and math.isclose(record["best_val_metric"], math.exp(best))
    assert record["peak_memory_kind"] == "cpu_whole_step_peak" and record["peak_memory_mb"] > 0
    # The whole-step peak holds at least the weights, gradients and AdamW state; activations are apart.
    peak = record["step_peak"]
    assert record["peak_memory_mb"] * 2**20 == peak["peak_bytes"] >= peak["state_bytes"] > 0
    assert 0 < record["activation_memory_mb"] < record["peak_memory_mb"]
    assert record["tokens_per_s"] > 0 and record["wall_time_s"] > 0
    assert record["hyperparameters"]["seq_len"] == 20 and record["hyperparameters"]["learning_rate"] == 3e-3
    assert (record["seed"], record["device"], record["precision"], record["nan_count"]) == (5, "cpu", "fp32", 0)
    assert record["versions"]["torch"] == __import__("torch").__version__
    assert record["early_stopped"] is False


def test_plain_trainer_writes_every_field(tmp_path):
    trainer = Trainer(model=tiny_model("gpt_neox"), args=TrainingArguments(**settings(tmp_path)),
                      train_dataset=dataset(8), eval_dataset=dataset(4), callbacks=[BWSKCallback()])
    trainer.train()
    record = json.loads((tmp_path / TRAINING_RESULTS).read_text())
    check_record(record, steps=4)
    assert record["mode"] == "conventional"
    assert record["s_ratio"] is None and record["reversible"] is None


def test_bwsk_trainer_adds_ratios_and_reversible_status(tmp_path):
    args = BWSKTrainingArguments(bwsk_mode="reversible", bwsk_analysis_seq_len=8, **settings(tmp_path))
    trainer = BWSKTrainer(model=tiny_model("gpt_neox"), args=args, train_dataset=dataset(8), eval_dataset=dataset(4))
    trainer.train()
    record = json.loads((tmp_path / TRAINING_RESULTS).read_text())
    check_record(record, steps=4)
    assert record["mode"] == "reversible"
    assert math.isclose(record["s_ratio"] + record["k_ratio"] + record["gray_ratio"], 1.0)
    assert record["reversible"]["status"] == "active"
    assert record["reversible"]["plan"]["recomputed_ops"]


def test_nan_losses_are_counted_and_best_skips_them(tmp_path):
    state = TrainerState(global_step=3, max_steps=10, epoch=1.0, log_history=[
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": float("inf")},
        {"step": 3, "epoch": 1.0, "eval_loss": float("nan")}, {"step": 3, "epoch": 1.0, "eval_loss": 1.5},
    ])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    callback = BWSKCallback()
    callback.on_train_begin(args, state, None, model=tiny_model("gpt2"))
    record = callback.results(args, state, tiny_model("gpt2"), wall_time=1.0)
    assert record["nan_count"] == 3
    assert record["best_val_loss"] == 1.5 and record["early_stopped"] is True

"""BWSKTrainer in its three modes against the stock Trainer, and BWSKTrainingArguments' validation."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, tiny_batch, tiny_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_bwsk.errors import BWSKError
from hf_bwsk.layout import ANALYSIS_HTML, CALM_REPORT, SK_REPORT
from hf_bwsk.memory.checkpointing import checkpointing_enabled
from hf_bwsk.training.args import BWSK_MODES, BWSKTrainingArguments, parse_byte_size
from hf_bwsk.training.trainer import BWSKTrainer


def dataset(count=16, seq_len=16):
    return [{key: value[0] for key, value in tiny_batch(1, seq_len, seed=i).items()} for i in range(count)]


def train(arch, output_dir, mode=None, steps=4, seed=0, **overrides):
    """Train a tiny model; `mode=None` means the stock Trainer. Returns (trainer, per-step losses)."""
    settings = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                    learning_rate=3e-3, seed=seed, report_to=[], save_strategy="no", use_cpu=True,
                    disable_tqdm=True, **overrides)
    if mode is None:
        trainer = Trainer(model=tiny_model(arch, seed=seed), args=TrainingArguments(**settings), train_dataset=dataset())
    else:
        args = BWSKTrainingArguments(bwsk_mode=mode, bwsk_loss_chunk_size=20, bwsk_analysis_seq_len=8, **settings)
        trainer = BWSKTrainer(model=tiny_model(arch, seed=seed), args=args, train_dataset=dataset())
    trainer.train()
    return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_conventional_is_the_stock_trainer(tmp_path):
    _, stock = train("gpt_neox", tmp_path / "stock")
    _, conventional = train("gpt_neox", tmp_path / "conventional", mode="conventional")
    assert conventional == stock


def test_analyzed_trains_identically_and_reports(tmp_path):
    _, conventional = train("gpt2", tmp_path / "conventional", mode="conventional")
    trainer, analyzed = train("gpt2", tmp_path / "analyzed", mode="analyzed")
    assert analyzed == conventional  # exactly: the analysis must not touch the RNG or the model
    logged = next(log for log in trainer.state.log_history if "bwsk/s_ratio" in log)
    ratios = {kind: logged[f"bwsk/{kind}_ratio"] for kind in ("s", "k", "gray")}
    assert sum(ratios.values()) == pytest.approx(1.0) and ratios["s"] > 0
    sk = json.loads((tmp_path / "analyzed" / SK_REPORT).read_text())
    assert sk["records"], "the S/K report JSON holds the traced ops"
    calm = json.loads((tmp_path / "analyzed" / CALM_REPORT).read_text())
    # GPT-2's attention mixes along the sequence, its matmuls contract the hidden axis, the loss the batch.
    assert {axis: report["sync_count"] > 0 for axis, report in calm["axes"].items()} == {
        "batch": True, "sequence": True, "hidden": True}, calm["axes"].keys()
    html = (tmp_path / "analyzed" / ANALYSIS_HTML).read_text()
    assert "Per-layer S/K map" in html and "Recompute plan" not in html


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_reversible_training_follows_conventional_for_20_steps(tmp_path, arch):
    _, conventional = train(arch, tmp_path / "conventional", mode="conventional", steps=20)
    trainer, reversible = train(arch, tmp_path / "reversible", mode="reversible", steps=20)
    assert trainer.reversible_mode.status()["status"] == "active"
    torch.testing.assert_close(torch.tensor(reversible), torch.tensor(conventional), rtol=1e-5, atol=1e-6)
    assert sum(reversible[-5:]) < sum(reversible[:5]), f"loss did not fall: {reversible}"
    untrained = tiny_model(arch)
    unchanged = [name for name, param in trainer.model.named_parameters()
                 if torch.equal(param, untrained.get_parameter(name))]
    assert not unchanged, f"parameters left untouched by training: {unchanged}"
    # The model is handed back unpatched and without checkpointing.
    assert "forward" not in trainer.model.__dict__ and not checkpointing_enabled(trainer.model)


def test_arguments_are_flags_and_validated(tmp_path):
    parser = HfArgumentParser(BWSKTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bwsk_mode", "reversible", "--bwsk_memory_budget", "1.5MiB",
         "--bwsk_loss_chunk_size", "256", "--use_cpu", "True"])
    assert (args.bwsk_mode, args.bwsk_loss_chunk_size) == ("reversible", 256)
    assert args.bwsk_memory_budget_bytes == int(1.5 * 2**20)
    help_text = parser.format_help()
    for name in ("--bwsk_mode", "--bwsk_loss_chunk_size", "--bwsk_memory_budget", "--bwsk_report_dir",
                 "--bwsk_analysis_seq_len"):
        assert name in help_text
    with pytest.raises(BWSKError) as error:
        BWSKTrainingArguments(output_dir=str(tmp_path), bwsk_mode="fast", use_cpu=True)
    assert all(mode in str(error.value) for mode in BWSK_MODES)
    with pytest.raises(BWSKError, match="only applies to bwsk_mode='reversible'"):
        BWSKTrainingArguments(output_dir=str(tmp_path), bwsk_memory_budget="1GB", use_cpu=True)
    with pytest.raises(BWSKError, match="byte size"):
        parse_byte_size("lots")
    assert parse_byte_size("800MB") == 800 * 10**6 and parse_byte_size(4096) == 4096


def test_trainer_takes_an_activation_budget_and_records_it(tmp_path):
    _, conventional = train("gpt_neox", tmp_path / "conventional", mode="conventional")
    trainer, losses = train("gpt_neox", tmp_path / "budget", mode="reversible", bwsk_activation_budget="100KB")
    plan = trainer.reversible_mode.status()["plan"]
    assert plan["policy"] == "budget" and plan["budget_bytes"] == 100_000 >= plan["kept_bytes_estimate"], plan
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(conventional), rtol=1e-5, atol=1e-6)
    results = json.loads((tmp_path / "budget" / "training_results.json").read_text())
    assert results["hyperparameters"]["bwsk_activation_budget"] == "100KB"


def test_budget_below_minimum_stops_before_the_first_step(tmp_path):
    with pytest.raises(BWSKError, match="below the minimum"):
        train("opt", tmp_path, mode="reversible", bwsk_memory_budget="1KB")


def test_push_to_hub_card_is_ours(tmp_path):
    trainer, _ = train("llama", tmp_path, mode="reversible", steps=2)
    assert "<h2>Recompute plan</h2>" in (tmp_path / ANALYSIS_HTML).read_text(), "rewritten with the plan"
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---") and "bwsk" in card.lower()


def test_reversible_under_bf16_autocast(tmp_path):
    _, conventional = train("gpt_neox", tmp_path / "conventional", mode="conventional", steps=3, bf16=True)
    trainer, reversible = train("gpt_neox", tmp_path / "reversible", mode="reversible", steps=3, bf16=True)
    assert trainer.reversible_mode.status()["status"] == "active"
    # bf16 matmuls: the fused loss accumulates the head gradient in fp32, so steps after the first drift by ~1e-4.
    torch.testing.assert_close(torch.tensor(reversible), torch.tensor(conventional), rtol=1e-3, atol=1e-3)


DDP_SCRIPT = """
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
from test_trainer import train
losses = {}
for mode in ("conventional", "reversible"):
    trainer, losses[mode] = train("gpt_neox", tempfile.mkdtemp(), mode=mode, steps=3)
    losses[mode + "_wrapper"] = type(trainer.model_wrapped).__name__
losses["status"] = trainer.reversible_mode.status()["status"]
if trainer.is_world_process_zero():
    json.dump(losses, open(sys.argv[2], "w"))
del trainer  # it holds the process group through DDP's reducer
from process_group import leave_process_group
leave_process_group()
"""


@pytest.mark.slow
def test_reversible_under_ddp_matches_conventional(tmp_path):
    # Two CPU processes (gloo). Equal losses after the first step show the gradients were all-reduced:
    # the forward went through DDP's wrapper although the model's forward was patched.
    script, result = tmp_path / "ddp_train.py", tmp_path / "losses.json"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
               str(Path(__file__).parent), str(result)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    losses = json.loads(result.read_text())
    assert losses["status"] == "active" and losses["reversible_wrapper"] == "DistributedDataParallel"
    torch.testing.assert_close(torch.tensor(losses["reversible"]), torch.tensor(losses["conventional"]),
                               rtol=1e-5, atol=1e-6)

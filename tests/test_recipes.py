"""The recipes: thin scripts over the runner, their YAML configs, accelerate configs, and real launches."""

import dataclasses
import json
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hf_bwsk.experiments.args import parse_arguments
from hf_bwsk.experiments.data import TinyCorpus
from hf_bwsk.experiments.presets import MAMBA_PRESETS, PYTHIA_PRESETS, get_preset
from hf_bwsk.recipe import run_experiment

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("recipe, presets", [("pythia.py", PYTHIA_PRESETS), ("mamba.py", MAMBA_PRESETS)])
def test_recipe_is_a_preset_and_one_call(recipe, presets):
    namespace = runpy.run_path(str(RECIPES / recipe), run_name="imported")  # not "__main__": nothing runs
    assert namespace["main"].__module__ == "hf_bwsk.recipe"
    assert any(value is presets for value in namespace.values())
    assert namespace["__doc__"] and "accelerate launch" in namespace["__doc__"]


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(PYTHIA_PRESETS, ["--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--modes", "--experiments", "--output_dir", "--seed", "--max_epochs", "--train_file",
                 "--validation_file", "--test_file", "--resume", "--overwrite_output_dir", "--hub_repo_id",
                 "--push_to_hub", "--bwsk_loss_chunk_size", "--scratch_learning_rate", "--base_model"):
        assert flag in text, f"{flag} missing from --help"
    from hf_bwsk.experiments.args import ExperimentArguments

    undocumented = [f.name for f in dataclasses.fields(ExperimentArguments) if not f.metadata.get("help")]
    assert not undocumented, f"flags without help: {undocumented}"


@pytest.mark.parametrize("config, presets, batch, learning_rate", [
    ("pythia_full.yaml", PYTHIA_PRESETS, 8, 5e-5),
    ("mamba_full.yaml", MAMBA_PRESETS, 2, 3e-5),
])
def test_shipped_yaml_configs_give_the_published_setup(config, presets, batch, learning_rate):
    args, training_args = parse_arguments(presets, [str(RECIPES / config)])
    preset = get_preset(presets, args.preset)
    assert args.preset == "full" and preset.data.name == "wikitext"
    assert training_args.per_device_train_batch_size == batch and training_args.learning_rate == learning_rate
    assert args.max_epochs == 10 and args.early_stopping_patience == 3


@pytest.mark.parametrize("name, kind", [("multi_gpu.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / "accelerate_configs" / name))
    assert config.distributed_type.value == kind and config.num_machines == 1
    assert config.mixed_precision == "no"


@pytest.mark.slow
def test_mamba_variants_train_offline(tmp_path):
    before = torch.get_num_threads()
    presets = {"tiny": dataclasses.replace(MAMBA_PRESETS["tiny"], data=TinyCorpus(max_chars=40_000),
                                           max_epochs=2, logging_steps=4)}
    args, training_args = parse_arguments(presets, [
        "--output_dir", str(tmp_path), "--experiments", "finetune", "--modes", "conventional,reversible",
        "--disable_tqdm", "true"])
    results = run_experiment(presets["tiny"], args, training_args)
    assert results["arch_family"] == "ssm" and results["slug"] == "mamba-tiny"
    conventional, reversible = results["runs"]
    for record in results["runs"]:
        losses = [point["loss"] for point in record["loss_curve"]]
        assert losses[-1] < losses[0], f"{record['variant']}: loss did not fall: {losses}"
        assert (tmp_path / record["variant"] / "model.safetensors").is_file()
    assert torch.get_num_threads() == before, "the runner must restore the caller's thread count"
    # Reversible mode trains at the same gradients: the curves agree to float tolerance.
    assert reversible["test_loss"] == pytest.approx(conventional["test_loss"], rel=1e-3)


@pytest.mark.slow
def test_two_process_launch_of_the_real_recipe(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: one gloo group, only rank 0 writes."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    out = tmp_path / "out"
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPES / "pythia.py"), "--preset", "tiny",
        "--output_dir", str(out), "--experiments", "scratch", "--modes", "conventional", "--max_epochs", "1",
        "--disable_tqdm", "true",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    record = results["runs"][0]
    assert results["hyperparameters"]["world_size"] == 2
    assert record["hyperparameters"]["total_train_batch_size"] == 16
    assert done.stdout.count("### From Scratch") == 1, "only the main process prints the tables"
    assert sorted(p.name for p in out.iterdir()) == [".hf-bwsk-run.json", "checkpoints", "results.json",
                                                     "scratch-conventional"]
    train_blocks = results["dataset"]["train_blocks"]
    assert record["total_steps"] in (train_blocks // 16, -(-train_blocks // 16)), (
        f"{record['total_steps']} steps for {train_blocks} blocks: each step must take a batch on each of 2 ranks")

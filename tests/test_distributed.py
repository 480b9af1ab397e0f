"""The reversible mode under `accelerate launch` with the shipped configs: 2 CPU processes (gloo).

Each launch trains conventional and reversible in the same processes, on the same batches, and
compares per-step losses and the first step's gradients (after DDP's all-reduce; FSDP2's gathered
from the shards). What the mode cannot run under is refused before the first step.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from grad_compare import assert_tensors_close

from hf_bwsk.memory.support import distributed_refusal

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "recipes" / "accelerate_configs"


def launch(config: str, script: str, result: Path, *arguments: str) -> dict:
    """`accelerate launch --config_file <config>` on CPU: the config's 2 processes, gloo."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    command = ["accelerate", "launch", "--config_file", str(CONFIGS / config), str(TESTS / script), str(result),
               *arguments]
    # Two processes on two cores; the worktree first on the path, as in this pytest run.
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(result.read_text())


def assert_same_training(results: dict) -> None:
    conventional, reversible = results["conventional"], results["reversible"]
    status = reversible["status"]
    assert status["status"] == "active", status
    assert status["plan_fidelity"]["plan_hits"] > 0 and status["plan_fidelity"]["plan_misses"] == 0
    assert_tensors_close(torch.tensor(reversible["losses"]), torch.tensor(conventional["losses"]),
                         rtol=1e-5, atol=1e-6, name="per-step losses")
    losses = reversible["losses"]
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    gradients = conventional["gradients"]
    assert gradients, "no first-step gradients to compare"
    for name, expected in gradients.items():
        assert_tensors_close(torch.tensor(reversible["gradients"][name]), torch.tensor(expected),
                             rtol=1e-5, atol=1e-6, name=f"first-step gradient of {name}")


@pytest.mark.slow
def test_reversible_under_ddp_with_the_multi_gpu_config(tmp_path):
    results = launch("multi_gpu.yaml", "distributed_train.py", tmp_path / "ddp.json", "gpt_neox", "4")
    assert {results[mode]["wrapper"] for mode in ("conventional", "reversible")} == {"DistributedDataParallel"}
    assert results["reversible"]["world_size"] == 2
    assert_same_training(results)


@pytest.mark.slow
def test_reversible_under_fsdp2_with_the_fsdp_config(tmp_path):
    results = launch("fsdp.yaml", "fsdp2_train.py", tmp_path / "fsdp.json", "gpt_neox", "4")
    assert results["world_size"] == 2
    for mode in ("conventional", "reversible"):
        assert (results[mode]["sharded"], results[mode]["layer_sharded"]) == ("FSDPGPTNeoXForCausalLM", "FSDPGPTNeoXLayer")
    assert_same_training(results)
    # The per-op execution too (what torch.compile runs): its plan hit under FSDP2 on every torch.
    assert results["reversible_per_op"]["status"]["execution"] == "per_op"
    # Under transformers 5.17 (which checkpoints a layer's __call__) FSDP2's unshard runs inside the
    # checkpoint, before the layer's own hooks: recomputed as plain checkpointing would, never kept.
    fidelity = results["reversible_per_op"]["status"]["plan_fidelity"]
    checkpoints_call = not hasattr(PreTrainedModel, "activation_checkpointing_enable")  # transformers 5.17
    assert (fidelity["outside_layer"] > 0) == checkpoints_call, fidelity
    assert_same_training({"conventional": results["conventional"], "reversible": results["reversible_per_op"]})
    # A head sharded in a unit of its own: the fused loss cannot read it, so the model's own loss trains it
    # (under the layer policy).
    own_head = results["reversible_own_head_unit"]
    assert own_head["status"]["loss"] == "model" and "sharded" in own_head["status"]["loss_reason"]
    assert_tensors_close(torch.tensor(own_head["losses"]), torch.tensor(results["conventional"]["losses"]),
                         rtol=1e-5, atol=1e-6, name="fallback losses")


@pytest.mark.parametrize("plugin, fix", [
    (lambda: FullyShardedDataParallelPlugin(fsdp_version=1), "fsdp_version: 2"),
    (lambda: FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True),
     "fsdp_activation_checkpointing: false"),
    (lambda: FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=True), "fsdp_offload_params: false"),
])
def test_unsupported_fsdp_setups_are_refused_naming_the_fix(plugin, fix):
    reason = distributed_refusal(fsdp_plugin=plugin())
    assert reason is not None and fix in reason and "\n" not in reason


def test_zero3_is_refused_and_the_shipped_layouts_are_not():
    reason = distributed_refusal(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3))
    assert reason is not None and "FSDP2" in reason
    assert distributed_refusal(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2)) is None
    assert distributed_refusal(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)) is None
    assert distributed_refusal() is None

"""Launched as 2 CPU processes by tests/test_distributed.py with recipes/accelerate_configs/fsdp.yaml.

Usage: accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml --multi_gpu tests/fsdp2_train.py RESULT.json ARCH STEPS

accelerate enables FSDP only on accelerators (on CPU its state stays MULTI_CPU), so this script hands
the launch's FSDP settings (the FSDP_* environment that `accelerate launch` set from the config) to
accelerate's own FSDP2 preparation, `fsdp2_prepare_model`: `fully_shard` on every decoder layer
(TRANSFORMER_BASED_WRAP) and on the root, exactly the layout a GPU launch gets. Then it trains
conventional, reversible, and reversible with the head sharded in a unit of its own (which the
mode's fused loss cannot use: it keeps the model's own loss, not crash), with the same optimizer and batches and writes, from rank 0, the losses
(averaged over ranks) and the full first-step gradients (gathered from the shards).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from process_group import leave_process_group  # noqa: E402
from tiny_models import tiny_batch, tiny_model  # noqa: E402

from hf_bwsk.analysis import find_decoder_layers  # noqa: E402
from hf_bwsk.memory import ReversibleMode  # noqa: E402


def train(accelerator, mode: str, arch: str, steps: int) -> dict:
    model = tiny_model(arch)
    model.train()
    reversible = None
    if mode != "conventional":
        execution = "per_op" if mode == "reversible_per_op" else "auto"
        reversible = ReversibleMode(model, find_layers=find_decoder_layers, loss_chunk_size=20, execution=execution)
        reversible.install_forward()  # before sharding, as BWSKTrainer does before accelerate's prepare
    if mode == "reversible_own_head_unit":
        # torch's FSDP2 by hand: the layers, the head on its own (resharded after its call, so outside
        # it the weight is a DTensor), the root.
        for layer in find_decoder_layers(model)[1]:
            fully_shard(layer)
        fully_shard(model.get_output_embeddings())
        fully_shard(model)
    else:
        model = fsdp2_prepare_model(accelerator, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rank = accelerator.process_index
    losses, gradients = [], None
    for step in range(steps):
        batch = tiny_batch(2, 16, seed=rank)  # the same batch every step: the loss must fall
        loss = model(**batch).loss
        loss.backward()
        if gradients is None:  # full_tensor() is a collective: every rank gathers
            gradients = {name: param.grad.full_tensor().tolist() for name, param in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    status = reversible.status() if reversible is not None else None
    if reversible is not None:
        reversible.teardown()
    return {"losses": losses, "gradients": gradients, "status": status,
            "sharded": type(model).__name__, "layer_sharded": type(find_decoder_layers(model)[1][0]).__name__}


def main():
    result_path, arch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* settings
    assert accelerator.state.fsdp_plugin.fsdp_version == 2, "launch with recipes/accelerate_configs/fsdp.yaml"
    modes = ("conventional", "reversible", "reversible_per_op", "reversible_own_head_unit")
    results = {mode: train(accelerator, mode, arch, steps) for mode in modes}
    results["world_size"] = accelerator.num_processes
    if accelerator.is_main_process:
        Path(result_path).write_text(json.dumps(results, default=str), encoding="utf-8")

    leave_process_group()


if __name__ == "__main__":
    main()

"""The end of a launched test script: the process group destroyed before the interpreter finalizes."""

import gc

import torch


def leave_process_group() -> None:
    """Destroy the default process group once nothing holds it any more.

    Models wrapped by DDP or sharded by FSDP2 hold the group (the reducer, the device meshes), often in
    reference cycles, so it outlives `destroy_process_group` unless they are collected first. Left to the
    interpreter's exit, a gloo worker thread may still be freeing a collective's tensors: it takes the GIL
    during finalization and aborts the process (torch 2.13, about one launch in three). Collected here,
    destroying the group joins those threads while the interpreter is alive. Callers drop their own
    references to trainers and models first.
    """
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

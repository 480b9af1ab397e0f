"""Side computations that must not move the random streams a training run draws from."""

import contextlib

import torch


@contextlib.contextmanager
def forked_rng(device: torch.device):
    """Run a side computation without moving the RNG streams the training draws from."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield

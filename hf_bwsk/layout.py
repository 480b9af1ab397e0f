"""One home for every name that appears on disk or in a card: folders, files, labels, the marker.

An experiment's output directory::

    output_dir/
      .hf-bwsk-run.json          marker: this runner wrote the directory (recipe, preset, seed)
      results.json               the grid's results (docs/RESULTS_FORMAT.md)
      <experiment>-<mode>/       finetune|scratch x conventional|bwsk-analyzed|bwsk-reversible:
                                 model.safetensors, config.json, tokenizer files, training_results.json
      checkpoints/               everything else: per-variant Trainer checkpoints and optimizer
                                 states, the tiny preset's corpus and pretrained base

A trainer's ``output_dir`` holds ``training_results.json`` and, outside ``conventional`` mode, the
S/K and CALM reports. Every other module imports these names from here.
"""

import json
import os
from pathlib import Path

from .errors import BWSKError

EXPERIMENTS = ("finetune", "scratch")
MODES = ("conventional", "analyzed", "reversible")
MODE_FOLDERS = {"conventional": "conventional", "analyzed": "bwsk-analyzed", "reversible": "bwsk-reversible"}
EXPERIMENT_LABELS = {"finetune": "Fine-tune", "scratch": "From Scratch"}
MODE_LABELS = {"conventional": "Conventional", "analyzed": "BWSK Analyzed", "reversible": "BWSK Reversible"}

MARKER = ".hf-bwsk-run.json"
RESULTS = "results.json"
TRAINING_RESULTS = "training_results.json"
SK_REPORT = "sk_report.json"
CALM_REPORT = "calm_report.json"
CHECKPOINTS = "checkpoints"
PARTIAL_SUFFIX = ".partial"
README = "README.md"
LOSS_PLOT = "plots/loss_curves.png"
MEMORY_PLOT = "plots/peak_memory.png"
MEMORY_KINDS = {
    "cuda_max_allocated": "whole-step peak, CUDA max allocated (weights, gradients, optimizer state, activations)",
    "cpu_whole_step_peak": "whole-step peak, live storages on CPU (weights, gradients, optimizer state, activations)",
    "cpu_bytes_kept_for_backward": "bytes kept for backward after one forward (CPU; not a peak)",
}
# What `activation_memory_mb` is, wherever it is shown beside the peak.
ACTIVATION_MEMORY_LABEL = "activations kept for backward after the forward"


def variant_name(experiment: str, mode: str) -> str:
    """The folder of one variant, e.g. ``finetune-bwsk-reversible``."""
    return f"{experiment}-{MODE_FOLDERS[mode]}"


VARIANTS = tuple(variant_name(experiment, mode) for experiment in EXPERIMENTS for mode in MODES)


def variant_label(experiment: str | None, mode: str) -> str:
    """Human name of a variant, e.g. ``Fine-tune (BWSK Reversible)``; the model-index result name."""
    if experiment is None:
        return MODE_LABELS[mode]
    return f"{EXPERIMENT_LABELS[experiment]} ({MODE_LABELS[mode]})"


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; a missing or broken file is a one-line error ending in ``what`` to do."""
    path = Path(path)
    if not path.is_file():
        raise BWSKError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BWSKError(f"{path} is not valid JSON ({error}); re-run the step that writes it") from error

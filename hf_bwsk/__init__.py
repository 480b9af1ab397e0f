"""hf-bwsk: S/K + CALM analysis and a memory-lean, exact training mode for the Hugging Face Trainer.

The public API is re-exported here lazily (PEP 562): `import hf_bwsk` stays light (no transformers,
datasets, evaluate or matplotlib) until a name is used, so benchmarks and the CLI start fast.
"""

import importlib

from .errors import BWSKError

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "analysis",
    "calm_report": "analysis",
    "find_decoder_layers": "analysis",
    "SKReport": "analysis",
    "CalmReport": "analysis",
    "OpRecord": "analysis",
    "ModuleView": "analysis",
    "BUILTIN_MODELS": "models",
    "load_config": "models",
    "apply_reversible": "memory",
    "ReversibleMode": "memory",
    "fused_linear_cross_entropy": "memory",
    "LiveStorageTracker": "memory",
    "MemoryMeasurement": "memory",
    "bytes_kept_for_backward": "memory",
    "count_train_flops": "memory",
    "BWSKTrainingArguments": "training.args",
    "BWSKTrainer": "training.trainer",
    "BWSKMixin": "training.mixin",
    "BWSKCallback": "training.callback",
    "render_variant_card": "training.model_card",
    "render_card": "publishing",
    "write_card": "publishing",
    "assemble": "publishing",
    "push": "publishing",
    "check_token": "publishing",
}

__all__ = ["BWSKError", "__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_bwsk' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)

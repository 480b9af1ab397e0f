"""Op-level S/K/Gray analysis of causal LMs and its CALM report (docs/ANALYSIS.md).

The names are re-exported lazily (PEP 562): the standard-library modules of this package (the
output cache, `hf_bwsk.analysis.cache`) load without torch and transformers.
"""

import importlib

_EXPORTS = {
    "analyze": "analyzer",
    "CalmReport": "calm",
    "calm_report": "calm",
    "find_decoder_layers": "layers",
    "ModuleView": "module_view",
    "OpRecord": "records",
    "SKReport": "report",
}

__all__ = ["CalmReport", "ModuleView", "OpRecord", "SKReport", "analyze", "calm_report", "find_decoder_layers"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

"""The experiments layer: presets, data, the tiny offline base, and the six-variant grid runner."""

from .args import ExperimentArguments, parse_arguments
from .presets import MAMBA_PRESETS, PRESETS, PYTHIA_PRESETS, Preset, get_preset
from .runner import GridRun, run_grid

__all__ = [
    "MAMBA_PRESETS", "PRESETS", "PYTHIA_PRESETS", "ExperimentArguments", "GridRun", "Preset", "get_preset",
    "parse_arguments", "run_grid",
]

"""Op-level S/K/Gray analysis of causal LMs and its CALM report (docs/ANALYSIS.md)."""

from .analyzer import analyze
from .calm import CalmReport, calm_report
from .layers import find_decoder_layers
from .module_view import ModuleView
from .records import OpRecord
from .report import SKReport

__all__ = ["CalmReport", "ModuleView", "OpRecord", "SKReport", "analyze", "calm_report", "find_decoder_layers"]

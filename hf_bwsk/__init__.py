"""hf-bwsk: S/K + CALM analysis and a memory-lean, exact training mode for the Hugging Face Trainer.

Importing the package stays light: datasets, evaluate and matplotlib are imported where used.
"""

from .errors import BWSKError

__version__ = "0.1.0"

__all__ = ["BWSKError", "__version__"]

"""The software and hardware a run happened on, for results files and bug reports."""

import os
import platform
from importlib.metadata import PackageNotFoundError, version

# Distribution names, read from installed metadata so that nothing heavy (datasets, evaluate) is imported.
_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "huggingface_hub",
    "datasets",
    "evaluate",
    "safetensors",
    "hf_bwsk",
)


def versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries a run depends on; ``None`` for one not installed."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def device_description() -> str:
    """One line naming the accelerator (CUDA devices and CUDA version) or the CPU when there is none."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(index) for index in range(count)})
        return f"cuda: {count} x {' / '.join(names)} (CUDA {torch.version.cuda})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (CUDA not available)"

"""The software and hardware a run happened on, for results files and bug reports."""

import importlib.util
import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Distribution names: each one's running __version__, else its installed metadata (nothing is imported).
_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "huggingface_hub",
    "datasets",
    "evaluate",
    "safetensors",
    "peft",
    "trl",
    "hf_bwsk",
)


def versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries a run depends on, as the running modules say (``__version__``).

    ``None`` for one not installed. Imports none of them: a package not imported yet is read from its
    installed metadata, and torch from its ``version.py``.
    """
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        found[package] = package_version(package)
    return found


def package_version(package: str) -> str | None:
    """``package.__version__`` (e.g. torch's ``2.14.1+cu130``), without importing it; None when not installed."""
    running = getattr(sys.modules.get(package), "__version__", None)
    if running is not None:
        return str(running)
    if package == "torch":
        # The one dependency whose build tag (+cpu, +cu130) is in its __version__ but not in its metadata.
        built = _torch_version_file()
        if built is not None:
            return built
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _torch_version_file() -> str | None:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).with_name("version.py")
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", path.read_text(), re.M) if path.is_file() else None
    return found.group(1) if found else None


def device_description() -> str:
    """One line naming the accelerator (CUDA devices and CUDA version) or the CPU when there is none."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(index) for index in range(count)})
        return f"cuda: {count} x {' / '.join(names)} (CUDA {torch.version.cuda})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (CUDA not available)"

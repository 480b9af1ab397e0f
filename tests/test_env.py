"""`hf_bwsk.env`: versions and device, as recorded in results files."""

import platform
import subprocess
import sys

import torch
import transformers

from hf_bwsk.env import device_description, versions


def test_versions_names_every_dependency_with_its_installed_version():
    found = versions()
    assert set(found) == {
        "python", "torch", "transformers", "accelerate", "huggingface_hub",
        "datasets", "evaluate", "safetensors", "hf_bwsk",
    }
    assert found["python"] == platform.python_version()
    assert found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__
    assert all(isinstance(value, str) and value for value in found.values()), found


def test_versions_does_not_import_datasets_or_evaluate():
    code = "import sys, hf_bwsk.env as e; e.versions(); print(sorted({'datasets', 'evaluate'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_device_description_is_one_line_naming_the_device():
    description = device_description()
    assert "\n" not in description
    if torch.cuda.is_available():
        assert description.startswith("cuda: ") and torch.cuda.get_device_name(0) in description
    else:
        assert description.startswith("cpu: ") and "CUDA not available" in description

"""`hf_bwsk.env`: versions and device, as recorded in results files."""

import json
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
        "datasets", "evaluate", "safetensors", "peft", "trl", "hf_bwsk",
    }
    assert found["python"] == platform.python_version()
    assert found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__
    assert all(isinstance(value, str) and value for value in found.values()), found


def test_versions_imports_nothing_and_still_gives_torch_its_build_tag():
    # torch's metadata says e.g. 2.14.1 where its __version__ says 2.14.1+cu130: results must say what ran.
    code = ("import sys, json, hf_bwsk.env as e; found = e.versions(); "
            "print(json.dumps([found['torch'], sorted({'torch', 'datasets', 'evaluate', 'transformers'} & set(sys.modules))]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [torch.__version__, []], result.stdout


def test_device_description_is_one_line_naming_the_device():
    description = device_description()
    assert "\n" not in description
    if torch.cuda.is_available():
        assert description.startswith("cuda: ") and torch.cuda.get_device_name(0) in description
    else:
        assert description.startswith("cpu: ") and "CUDA not available" in description

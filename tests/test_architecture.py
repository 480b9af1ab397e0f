"""The layering of hf_bwsk, checked by import-linter against the contracts in pyproject.toml."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "lint-imports is missing: install the dev extra (pip install -e '.[dev]')"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    # On a broken contract import-linter names each offending import (importer -> imported, line).
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout

"""`benchmarks/gpu.py`, the one command for a CUDA machine, checked on the CPU (`--cpu`), and the
promise that it and the CUDA tests run where only torch, transformers, accelerate and peft exist."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ["conventional", "hf_checkpointing", "hf_checkpointing_fused_loss", "bwsk_reversible", "bwsk_reversible_budget"]


def run_python(args, extra_path=None, **kwargs):
    paths = [str(extra_path) if extra_path else None, str(ROOT), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def test_gpu_command_and_cuda_tests_import_without_datasets_evaluate_matplotlib():
    # A GPU image without them: importing a blocked module raises ImportError, as when it is not installed.
    script = (
        "import sys\n"
        "for name in ('datasets', 'evaluate', 'matplotlib'): sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(ROOT / 'benchmarks')!r}, {str(ROOT / 'tests')!r}]\n"
        "import gpu, gpu_step, test_cuda\n"
        "for cpu in (False, True): assert [c.name for c in gpu.cases(cpu)] == list(gpu.CASE_NAMES)\n"
        "print('imported')\n"
    )
    result = run_python(["-c", script])
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the command would run")
def test_gpu_command_without_cuda_or_cpu_flag_names_the_fix(tmp_path):
    result = run_python(["benchmarks/gpu.py", "--out", str(tmp_path)])
    assert result.returncode == 2 and "pass --cpu" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "gpu_benchmark.json").exists()


@pytest.mark.slow
def test_gpu_command_runs_its_logic_on_cpu_without_datasets_evaluate_matplotlib(tmp_path):
    # As on the GPU machine, which has none of them: a sitecustomize on the path makes importing them fail
    # in this process and in the pytest subprocess that runs the CUDA tests.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules.update(dict.fromkeys(('datasets', 'evaluate', 'matplotlib')))\n")
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nEarlier rows stay.\n")
    result = run_python(["benchmarks/gpu.py", "--cpu", "--out", str(tmp_path), "--steps", "1",
                         "--benchmarks", str(markdown)], timeout=900, extra_path=blocker)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_benchmark.json").read_text())

    tests = results["cuda_tests"]  # no CUDA here: every CUDA test collected and skipped, none failed
    assert tests["tests"] >= 15 and tests["skipped"] == tests["tests"] and tests["returncode"] == 0, tests
    assert [case["model"] for case in results["cases"]] == ["pythia-70m", "mamba-130m", "llama-1b-class"]
    for case in results["cases"]:
        rows = {row["mode"]: row for row in case["modes"]}
        assert list(rows) == MODES
        assert not [row for row in rows.values() if "error" in row], case
        for row in rows.values():
            assert row["peak_bytes"] > 0 and row["estimate_bytes"] > 0 and row["step_s"] > 0
            assert math.isfinite(row["first_loss"]) and row["loss_abs_diff"] < 1e-5, row
        assert rows["conventional"]["peak_ratio"] == 1.0
        # The whole-step tracker is deterministic: the fused loss never holds the logits, so every
        # bwsk mode peaks below conventional even at toy shapes.
        for mode in ("bwsk_reversible", "bwsk_reversible_budget"):
            assert rows[mode]["reversible"]["status"] == "active"
            assert rows[mode]["peak_ratio"] < 1.0, rows[mode]
            assert rows[mode]["predicted_bytes"] > 0
        budget = rows["bwsk_reversible_budget"]["reversible"]["peak_budget_bytes"]
        assert budget is not None and budget <= rows["bwsk_reversible"]["predicted_bytes"]
    assert len(results["targets"]) == 6 and all(isinstance(t["passed"], bool) for t in results["targets"])
    for key in ("date", "commit", "device", "versions"):
        assert results[key]

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nEarlier rows stay.\n")
    assert "## CUDA comparison (`benchmarks/gpu.py`)" in text and "(--cpu: logic check, not a result)" in text
    assert text.count("| fp32 |") == 15 and text.count(" -> PASS") + text.count(" -> FAIL") == 6

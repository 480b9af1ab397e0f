"""``hf-bwsk card`` and ``hf-bwsk push`` on the tiny run, against the local Hub-API server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_run import VARIANTS
from hub_server import TOKEN
from huggingface_hub import ModelCard

from hf_bwsk.cli import main

# huggingface_hub's LFS upload hands httpx2 a file object through ``data=``; httpx2 asks for ``content=``.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning:httpx2")


@pytest.fixture(scope="module")
def run_dir(fake_run_dir):
    return fake_run_dir


def assert_one_line_error(code, captured, *fragments):
    report = f"exit code {code}\nstdout: {captured.out!r}\nstderr: {captured.err!r}"
    assert code == 2 and captured.out == "", report
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-bwsk") and ": error: " in lines[0], report
    for fragment in fragments:
        assert fragment in lines[0], report


def test_card_writes_readme_and_plots(run_dir, capsys):
    assert main(["card", str(run_dir), "--repo-id", "tester/bwsk-tiny"]) == 0
    assert f"card written to {run_dir / 'README.md'}" in capsys.readouterr().out
    assert len(ModelCard.load(run_dir / "README.md").data.eval_results) == 6
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["loss_curves.png", "peak_memory.png"]


def test_card_on_an_incomplete_run_is_a_one_line_error(tmp_path, capsys):
    code = main(["card", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr(), "results.json is missing")


def test_push_dry_run_lists_files_without_network(run_dir, hf_home, hub, capsys):
    assert main(["push", str(run_dir), "--repo-id", "tester/bwsk-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for variant in VARIANTS:
        assert f"{variant}/model.safetensors" in out
    assert "checkpoints" not in out
    assert out.strip().splitlines()[-1].endswith("would push to tester/bwsk-tiny@main")
    assert hub.state.requests == []


def test_push_uploads_with_the_environment_token(run_dir, hf_home, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = main(["push", str(run_dir), "--repo-id", "tester/cli-run", "--private", "--commit-message", "tiny run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith(f"commit: {hub.endpoint}/tester/cli-run/commit/")
    assert hub.state.repos["tester/cli-run"].private
    files = hub.files("tester/cli-run")
    assert all(f"{variant}/model.safetensors" in files for variant in VARIANTS)
    assert b'repo = "tester/cli-run"' in files["README.md"]


@pytest.mark.parametrize("arguments, fragments", [
    (["--repo-id", "not a/valid id"], ["invalid repo id 'not a/valid id'"]),
    ([], ["--repo-id"]),
    (["--repo-id", "tester/x"], ["no Hugging Face token"]),
])
def test_push_bad_input_is_a_one_line_error_before_any_request(run_dir, hf_home, hub, capsys, arguments, fragments):
    code = main(["push", str(run_dir), *arguments])
    assert_one_line_error(code, capsys.readouterr(), *fragments)
    assert hub.state.requests == []


@pytest.mark.slow
def test_console_script_dry_run(run_dir, tmp_path):
    script = Path(sys.executable).with_name("hf-bwsk")
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(script), "push", str(run_dir), "--repo-id", "someone/bwsk-tiny", "--dry-run"],
                          capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    assert "finetune-bwsk-reversible/model.safetensors" in done.stdout

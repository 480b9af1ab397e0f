"""The ``hf-bwsk`` console script: analyze and env, and one-line errors for every bad input."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from tiny_models import tiny_config
from transformers import T5Config

from hf_bwsk import cli
from hf_bwsk.analysis import SKReport, analyze, calm_report
from hf_bwsk.cli import argument, main, subcommand
from hf_bwsk.env import versions
from hf_bwsk.models import BUILTIN_MODELS, load_config

# Small traced shapes keep each analysis well under a second.
SHAPE = ["--seq-len", "16", "--batch-size", "1"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("hf-bwsk")


@functools.cache
def reference_report(name: str) -> SKReport:
    """The report the CLI should print for a built-in name at the test shape, computed once."""
    return analyze(load_config(name), seq_len=16, batch_size=1)


def run_script(*arguments: str, **environment: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *arguments], capture_output=True, text=True, timeout=300,
        env={**os.environ, **environment},
    )


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    report = f"exit code {code}\nstdout: {out!r}\nstderr: {err!r}"
    assert code == 2, report
    assert out == "", report
    lines = err.splitlines()
    assert len(lines) == 1, report
    assert lines[0].startswith("hf-bwsk") and ": error: " in lines[0], report
    assert "Traceback" not in err, report
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing\n{report}"


# ---------------------------------------------------------------- analyze


@pytest.mark.slow
def test_console_script_analyzes_a_builtin_name():
    result = run_script("analyze", "pythia-70m", *SHAPE)
    assert result.returncode == 0, result.stderr
    report = reference_report("pythia-70m")
    assert report.to_table() in result.stdout
    assert calm_report(report).to_table() in result.stdout


def test_analyze_prints_op_table_module_view_and_calm_table(capsys):
    assert main(["analyze", "mamba-130m", *SHAPE]) == 0
    out = capsys.readouterr().out
    report = reference_report("mamba-130m")
    for table in (report.to_table(), report.module_view.to_table(), calm_report(report).to_table()):
        assert table in out


def test_analyze_a_local_directory_at_module_granularity(tmp_path, capsys):
    tiny_config("gpt_neox").save_pretrained(tmp_path)
    assert main(["analyze", str(tmp_path), *SHAPE, "--granularity", "module"]) == 0
    out = capsys.readouterr().out
    config = load_config(tmp_path)
    assert analyze(config, seq_len=16, batch_size=1, granularity="module").module_view.to_table() in out
    op_table = analyze(config, seq_len=16, batch_size=1).to_table()
    assert op_table.splitlines()[0] not in out, "module granularity prints the module view only"


def test_json_round_trip_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tiny_config("llama").save_pretrained(tmp_path / "model")
    json_path, png_path = tmp_path / "report.json", tmp_path / "layers.png"
    code = main(["analyze", str(tmp_path / "model"), *SHAPE, "--json", str(json_path), "--plot", str(png_path)])
    assert code == 0, capsys.readouterr().err
    loaded = SKReport.from_json(json_path)
    expected = analyze(load_config(tmp_path / "model"), seq_len=16, batch_size=1)
    assert loaded.to_dict() == expected.to_dict()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the analysis cache

# A second run answered from the cache: its printed output, and whether torch / transformers got imported.
CACHED_RUN = """
import sys
from hf_bwsk.cli import main
code = main(sys.argv[1:])
print("imported:", sorted(name for name in ("torch", "transformers") if name in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_a_repeated_analysis_comes_from_the_cache_without_torch(tmp_path):
    cache = tmp_path / "cache"
    first = run_script("analyze", "pythia-70m", *SHAPE, "--html", str(tmp_path / "a.html"),
                       "--json", str(tmp_path / "a.json"), HF_BWSK_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert len(list(cache.glob("*.json"))) == 1
    second = subprocess.run(
        [sys.executable, "-c", CACHED_RUN, "analyze", "pythia-70m", *SHAPE, "--html", str(tmp_path / "b.html"),
         "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_BWSK_CACHE": str(cache)},
    )
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip() == "imported: []", second.stderr
    assert second.stdout == first.stdout.replace("a.json", "b.json").replace("a.html", "b.html")
    assert (tmp_path / "b.html").read_bytes() == (tmp_path / "a.html").read_bytes()
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    assert reference_report("pythia-70m").to_table() in second.stdout


def test_cache_key_covers_options_outputs_and_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_BWSK_CACHE", str(tmp_path / "cache"))
    assert main(["analyze", "mamba-130m", *SHAPE]) == 0
    plain = capsys.readouterr().out
    assert main(["analyze", "mamba-130m", *SHAPE, "--granularity", "module"]) == 0
    assert capsys.readouterr().out != plain
    assert main(["analyze", "mamba-130m", "--seq-len", "17", "--batch-size", "1"]) == 0
    capsys.readouterr()
    assert main(["analyze", "mamba-130m", *SHAPE, "--json", str(tmp_path / "r.json")]) == 0
    assert SKReport.from_json(tmp_path / "r.json").to_table() in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4, "one entry per distinct command"
    # A local directory is keyed by its config's content: an edited config is traced afresh.
    model = tmp_path / "model"
    tiny_config("gpt_neox").save_pretrained(model)
    assert main(["analyze", str(model), *SHAPE]) == 0
    before = capsys.readouterr().out
    config = tiny_config("gpt_neox")
    config.num_hidden_layers += 1
    config.save_pretrained(model)
    assert main(["analyze", str(model), *SHAPE]) == 0
    after = capsys.readouterr().out
    assert after != before
    assert analyze(load_config(model), seq_len=16, batch_size=1).to_table() in after


@pytest.mark.parametrize("damage", ["garbage", "truncated", "edited", "directory"])
def test_a_damaged_cache_entry_is_ignored_and_rewritten(damage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_BWSK_CACHE", str(tmp_path / "cache"))
    assert main(["analyze", "gpt2", *SHAPE]) == 0
    expected = capsys.readouterr().out
    (entry,) = (tmp_path / "cache").glob("*.json")
    text = entry.read_text()
    if damage == "garbage":
        entry.write_bytes(b"\xff\x00 not json")
    elif damage == "truncated":
        entry.write_text(text[: len(text) // 2])
    elif damage == "edited":  # valid JSON whose output no longer matches its digest
        edited = json.loads(text)
        edited["output"]["stdout"] = "forged\n"
        entry.write_text(json.dumps(edited))
    else:
        entry.unlink()
        entry.mkdir()
    assert main(["analyze", "gpt2", *SHAPE]) == 0
    assert capsys.readouterr().out == expected
    if damage == "directory":  # not ours to delete: left as found, the command still answers
        assert entry.is_dir()
        return
    rewritten = json.loads(entry.read_text())
    assert rewritten["output"]["stdout"] == expected
    assert not list((tmp_path / "cache").glob(".*.tmp")), "no temporary file left behind"


def test_no_cache_leaves_the_cache_alone_and_the_default_lives_under_hf_home(tmp_path, monkeypatch, capsys):
    from hf_bwsk.analysis import cache

    monkeypatch.setenv("HF_BWSK_CACHE", str(tmp_path / "cache"))
    assert main(["analyze", "gpt2", *SHAPE, "--no-cache"]) == 0
    assert "Gray" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv("HF_BWSK_CACHE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
    assert cache.cache_dir() == tmp_path / "hf_home" / "hf_bwsk" / "analysis"


# ---------------------------------------------------------------- bad input


def test_console_script_error_is_one_line_with_exit_code_2():
    result = run_script("analyze", "pythia70m")
    assert_one_line_error(result.returncode, result.stdout, result.stderr, "unknown built-in model", *BUILTIN_MODELS)


def _not_a_causal_lm(tmp_path: Path) -> str:
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path)
    return str(tmp_path)


BAD_INPUTS = {
    "unknown built-in name": (lambda tmp: ["pythia70m"], ["unknown built-in model 'pythia70m'", "pythia-70m"]),
    "missing directory": (lambda tmp: [str(tmp / "nope")], ["does not exist", "existing model directory"]),
    "directory without config": (lambda tmp: [str(tmp)], ["has no config.json", "save_pretrained"]),
    "not a causal LM": (lambda tmp: [_not_a_causal_lm(tmp)], ["'t5' is not a decoder-only causal LM", "pythia-70m"]),
    "unknown granularity": (lambda tmp: ["pythia-70m", "--granularity", "leaf"], ["invalid choice: 'leaf'", "'op'"]),
    "zero sequence length": (lambda tmp: ["pythia-70m", "--seq-len", "0"], ["must be a positive integer"]),
    "plot of the module view": (
        lambda tmp: ["pythia-70m", "--granularity", "module", "--plot", str(tmp / "m.png")], ["--granularity op"],
    ),
    "json in a missing directory": (
        lambda tmp: ["pythia-70m", "--json", str(tmp / "no" / "r.json")], ["--json", "does not exist"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_that_names_the_fix(case, tmp_path, capsys):
    arguments, fragments = BAD_INPUTS[case]
    code = main(["analyze", *arguments(tmp_path)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, *fragments)


def test_unreachable_hub_is_one_line_naming_what_works_offline(monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["analyze", "hf-bwsk-tests/no-such-model"])
    captured = capsys.readouterr()
    assert_one_line_error(
        code, captured.out, captured.err,
        "could not reach the Hugging Face Hub for 'hf-bwsk-tests/no-such-model'", "pythia-70m",
        "local directory works offline",
    )


def test_debug_adds_the_traceback(capsys):
    assert main(["analyze", "pythia70m", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "BWSKError" in err
    assert err.splitlines()[-1].startswith("hf-bwsk: error: unknown built-in model")


# ---------------------------------------------------------------- env and structure


def test_env_prints_versions_and_cuda_availability(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name, version in versions().items():
        assert f"{name}: {version}" in out
    assert "device: " in out and ("cuda: " in out or "CUDA not available" in out)


def test_a_new_subcommand_is_one_function_and_one_registration(monkeypatch, capsys):
    @subcommand("echo", "print a number", argument("--times", type=int, required=True))
    def echo(args):
        print("echo" * args.times)

    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, echo))
    assert main(["echo", "--times", "3"]) == 0
    assert capsys.readouterr().out == "echoechoecho\n"
    assert main(["echo"]) == 2
    assert "--times" in capsys.readouterr().err

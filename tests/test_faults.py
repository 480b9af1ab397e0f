"""Injected faults: every item of "nothing lost, nothing false" (issue 9) as a test.

Runs that train go through the real recipe in a subprocess (``tests/tiny_recipe.py``), so exit
codes, printed lines and a ``kill -9`` are what a user sees; checks that refuse before any work run
in-process and stay fast.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_recipe import TEST_PRESETS

from hf_bwsk.errors import BWSKError
from hf_bwsk.experiments.args import parse_arguments
from hf_bwsk.experiments.checks import effective_hyperparameters, run_identity
from hf_bwsk.experiments.presets import get_preset
from hf_bwsk.experiments.run_dir import RunDirectory
from hf_bwsk.layout import LOCK, MARKER, read_marker, write_json
from hf_bwsk.recipe import main, run_experiment

RECIPE = Path(__file__).parent / "tiny_recipe.py"
# Four variants: the fine-tune ones get --learning_rate, the scratch ones the preset's.
GRID_FLAGS = ("--modes", "conventional,analyzed", "--experiments", "finetune,scratch", "--disable_tqdm", "true")
VARIANTS = ("finetune-conventional", "finetune-bwsk-analyzed", "scratch-conventional", "scratch-bwsk-analyzed")
# A resumed variant differs from an uninterrupted one only in its time and the flag that says so.
SESSION_FIELDS = {"wall_time_s", "tokens_per_s", "resumed"}
FOREIGN = {
    "notes.txt": "top level",
    "checkpoints/notes.txt": "beside the checkpoints",
    "checkpoints/my-old-ckpt/w.bin": "an old checkpoint of mine",
    "checkpoints/finetune-conventional/notes.txt": "in a Trainer folder",
    "checkpoints/tiny-corpus/notes.txt": "beside the corpus",
    "checkpoints/tiny-base/notes.txt": "beside the base",
    "finetune-conventional/notes.txt": "in a variant folder",
    "scratch-bwsk-analyzed/extra/notes.txt": "deeper in a variant folder",
}


def recipe_command(out, *flags) -> list[str]:
    return [sys.executable, str(RECIPE), "--output_dir", str(out), *GRID_FLAGS, *flags]


def run_recipe(out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(recipe_command(out, *flags), capture_output=True, text=True, timeout=600, env=os.environ)


def run_in_process(out, *flags):
    args, training_args = parse_arguments(TEST_PRESETS, ["--output_dir", str(out), *GRID_FLAGS, *flags])
    return run_experiment(get_preset(TEST_PRESETS, args.preset), args, training_args)


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def our_json_files(out: Path) -> list[Path]:
    """Every JSON file the runner wrote (Trainer's own files inside checkpoint-N/ are Trainer's)."""
    return [path for path in out.rglob("*.json") if not any(part.startswith("checkpoint-") for part in path.parts)]


def records(out: Path) -> dict[str, dict]:
    return {name: strict_json(out / name / "training_results.json") for name in VARIANTS}


def same_records(actual: dict, expected: dict, what: str) -> None:
    keys = (actual.keys() | expected.keys()) - SESSION_FIELDS
    differing = sorted(key for key in keys if actual.get(key) != expected.get(key))
    assert not differing, f"{what}: fields differ: " + "; ".join(
        f"{key}: {str(actual.get(key))[:100]} != {str(expected.get(key))[:100]}" for key in differing)


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """The recipe with --learning_rate 1e6: the fine-tune variants diverge, the scratch ones must not."""
    out = tmp_path_factory.mktemp("diverged") / "out"
    return out, run_recipe(out, "--learning_rate", "1e6")


@pytest.fixture(scope="module")
def clean_run(diverged_run, tmp_path_factory):
    """The diverged run's directory with foreign files everywhere, rerun with --overwrite_output_dir."""
    out = tmp_path_factory.mktemp("overwritten") / "out"
    shutil.copytree(diverged_run[0], out)
    for relative, content in FOREIGN.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(content)
    return out, run_recipe(out, "--overwrite_output_dir", "true")


# -- 1. divergence -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_diverged_variant_stops_the_others_go_on_and_the_run_fails(diverged_run):
    out, process = diverged_run
    assert process.returncode == 1, process.stderr[-3000:]
    summary = process.stderr.strip().splitlines()[-1]
    assert summary.startswith("error: 2 of 4 variants diverged: finetune-conventional at step "), summary
    assert "lower --learning_rate" in summary
    found = records(out)
    for name in ("scratch-conventional", "scratch-bwsk-analyzed"):
        record = found[name]
        assert record["diverged"] is None and math.isfinite(record["test_metric"]), name
        losses = [point["loss"] for point in record["loss_curve"]]
        assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"
    full_steps = found["scratch-conventional"]["total_steps"]
    for name in ("finetune-conventional", "finetune-bwsk-analyzed"):
        diverged = found[name]["diverged"]
        assert diverged and diverged["metric"] in ("loss", "grad_norm", "eval_loss"), found[name]
        assert diverged["value"] in ("nan", "inf", "-inf"), diverged
        assert found[name]["total_steps"] == diverged["step"] < full_steps, "a diverged variant must stop there"
        assert found[name]["test_metric"] is None and not found[name]["early_stopped"]


@pytest.mark.slow
def test_every_json_file_we_write_is_strict_and_names_its_non_finite_values(diverged_run):
    out, _ = diverged_run
    files = our_json_files(out)
    assert out / "results.json" in files and out / MARKER in files and len(files) > 10, files
    for path in files:
        strict_json(path)
    record = strict_json(out / "finetune-conventional" / "training_results.json")
    assert any(value == "nan" for value in record["non_finite"].values()), record.get("non_finite")


def test_the_callback_stops_a_run_at_its_first_non_finite_log():
    from transformers import TrainerControl
    from transformers.trainer_callback import TrainerState

    from hf_bwsk.training.callback import BWSKCallback

    callback, state, control = BWSKCallback(), TrainerState(global_step=3), TrainerControl()
    callback.on_log(None, state, control, logs={"loss": 2.0, "grad_norm": 1.0})
    assert not control.should_training_stop and callback.diverged is None
    state.global_step = 5
    callback.on_log(None, state, control, logs={"loss": 2.0, "grad_norm": torch.tensor(math.inf)})
    assert control.should_training_stop and callback.diverged == {"step": 5, "metric": "grad_norm", "value": "inf"}
    state.global_step = 6
    callback.on_log(None, state, control, logs={"eval_loss": math.nan})
    assert callback.diverged["step"] == 5, "the first divergence is the one recorded"


def test_write_json_turns_non_finite_values_into_named_nulls(tmp_path):
    write_json(tmp_path / "x.json", {"loss": math.nan, "curve": [{"loss": 1.0}, {"loss": math.inf}]})
    assert strict_json(tmp_path / "x.json") == {
        "loss": None, "curve": [{"loss": 1.0}, {"loss": None}], "non_finite": {"loss": "nan", "curve[1].loss": "inf"}}


def diverged_copy(fake_run_dir, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(fake_run_dir, run_dir)
    path = run_dir / "scratch-bwsk-reversible" / "training_results.json"
    record = strict_json(path)
    record.update(diverged={"step": 7, "metric": "loss", "value": "nan"}, test_metric=None, test_loss=None)
    write_json(path, record)
    results = strict_json(run_dir / "results.json")
    results["runs"] = [record if run["variant"] == record["variant"] else run for run in results["runs"]]
    write_json(run_dir / "results.json", results)
    return run_dir


def test_card_says_where_a_variant_diverged_and_leaves_it_out_of_the_model_index(fake_run_dir, tmp_path):
    from hf_bwsk.publishing.cards import render_card
    from hf_bwsk.publishing.plots import loss_curves_png

    run_dir = diverged_copy(fake_run_dir, tmp_path)
    card = render_card(run_dir)
    row = next(line for line in card.splitlines() if line.startswith("| BWSK Reversible |")
               and "diverged" in line)
    assert "diverged at step 7 (loss nan) | n/a | n/a |" in row, row
    front = card.split("---")[1]
    assert "From Scratch (BWSK Reversible)" not in front and "Fine-tune (BWSK Reversible)" in front
    record = strict_json(run_dir / "scratch-bwsk-reversible" / "training_results.json")
    record["loss_curve"].append({"step": 8, "loss": None})  # a non-finite loss, as strict JSON holds it
    assert loss_curves_png([record]).startswith(b"\x89PNG")


def test_push_refuses_a_diverged_run_unless_allowed(fake_run_dir, tmp_path, capsys):
    from hf_bwsk.cli import main as cli_main
    from hf_bwsk.publishing.hub import push

    run_dir = diverged_copy(fake_run_dir, tmp_path)
    with pytest.raises(BWSKError) as caught:
        push(run_dir, "me/run", dry_run=True)
    message = str(caught.value)
    assert "scratch-bwsk-reversible diverged at step 7" in message and "--allow-diverged" in message
    assert "\n" not in message
    assert cli_main(["push", str(run_dir), "--repo-id", "me/run", "--dry-run"]) == 2
    assert "--allow-diverged" in capsys.readouterr().err
    assert cli_main(["push", str(run_dir), "--repo-id", "me/run", "--dry-run", "--allow-diverged"]) == 0
    assert push(run_dir, "me/run", dry_run=True, allow_diverged=True).files


def test_push_refuses_non_finite_weights(fake_run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_bwsk.publishing.hub import push

    run_dir = tmp_path / "run"
    shutil.copytree(fake_run_dir, run_dir)
    weights_path = run_dir / "finetune-conventional" / "model.safetensors"
    weights = load_file(weights_path)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], math.nan)
    save_file(weights, weights_path, metadata={"format": "pt"})
    with pytest.raises(BWSKError, match=f"finetune-conventional has non-finite weights \\({name}\\)"):
        push(run_dir, "me/run", dry_run=True)


# -- 2. ownership --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_overwriting_deletes_only_what_we_wrote(clean_run):
    out, process = clean_run
    assert process.returncode == 0, process.stderr[-3000:]
    for relative, content in FOREIGN.items():
        assert (out / relative).is_file() and (out / relative).read_text() == content, f"{relative} was lost"
    written = set(read_marker(out)["written"])
    assert not written & set(FOREIGN), "foreign files must never enter the manifest"
    for name in VARIANTS:
        assert f"{name}/model.safetensors" in written and (out / name / "model.safetensors").is_file()
    assert all(record["diverged"] is None for record in records(out).values())


def test_overwrite_deletes_the_manifest_files_and_empty_folders_only(tmp_path):
    run_dir = RunDirectory(tmp_path)
    identity = {"recipe": "r", "preset": "tiny", "seed": 1}
    run_dir.prepare(identity, overwrite=False)
    ours = [tmp_path / "finetune-conventional" / "model.safetensors", tmp_path / "checkpoints" / "a" / "b.bin",
            tmp_path / "checkpoints" / "c" / "d.bin"]
    for path in ours:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("ours")
    run_dir.record(ours)
    (tmp_path / "checkpoints" / "c" / "mine.txt").write_text("mine")
    (tmp_path / "finetune-conventional" / "notes.txt").write_text("mine")
    run_dir.check(identity, resume=False, overwrite=True)
    run_dir.prepare(identity, overwrite=True)
    assert not any(path.exists() for path in ours)
    assert not (tmp_path / "checkpoints" / "a").exists(), "a folder we emptied is removed"
    assert (tmp_path / "checkpoints" / "c" / "mine.txt").read_text() == "mine"
    assert (tmp_path / "finetune-conventional" / "notes.txt").read_text() == "mine"
    assert read_marker(tmp_path) == {"identity": identity, "written": []}


# -- 3. resume -------------------------------------------------------------------------------------------

def test_resume_with_another_hyperparameter_is_refused_naming_keys_and_values(tmp_path):
    out = tmp_path / "out"
    args, training_args = parse_arguments(TEST_PRESETS, ["--output_dir", str(out), *GRID_FLAGS])
    preset = get_preset(TEST_PRESETS, "tiny")
    hyperparameters = effective_hyperparameters(preset, args, training_args, preset.block_size)
    RunDirectory(out).prepare(run_identity(preset, training_args, hyperparameters), overwrite=False)
    with pytest.raises(BWSKError) as caught:
        run_in_process(out, "--resume", "true", "--learning_rate", "1e-3", "--weight_decay", "0.1")
    message = str(caught.value)
    assert "finetune_learning_rate 0.0005 (run) vs 0.001 (now)" in message, message
    assert "weight_decay 0.0 (run) vs 0.1 (now)" in message and "\n" not in message
    assert sorted(path.name for path in out.iterdir()) == [MARKER], "a refused resume writes nothing"


# -- 4. precision ------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 AMP runs where CUDA is")
def test_fp16_without_cuda_is_refused_before_any_work(tmp_path):
    with pytest.raises(BWSKError, match="--fp16 needs a CUDA GPU") as caught:
        run_in_process(tmp_path / "out", "--fp16", "true")
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 AMP runs where CUDA is")
def test_bf16_without_its_device_is_a_one_line_error(tmp_path):
    with pytest.raises(BWSKError, match="bf16") as caught:
        parse_arguments(TEST_PRESETS, ["--output_dir", str(tmp_path), "--bf16", "true"])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("flags, expected", [({"fp16": True}, "fp32"), ({"bf16": True}, "bf16")])
def test_results_record_the_precision_that_ran(tmp_path, flags, expected):
    from tiny_models import tiny_batch, tiny_model

    from hf_bwsk.training.args import BWSKTrainingArguments
    from hf_bwsk.training.callback import BWSKCallback
    from hf_bwsk.training.trainer import BWSKTrainer

    if torch.cuda.is_available():
        pytest.skip("on CUDA both precisions run as asked")
    data = [{key: value[0] for key, value in tiny_batch(1, 16, seed=i).items()} for i in range(4)]
    args = BWSKTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True, **flags)
    # conventional mode adds no callback of its own: ask for the results file
    BWSKTrainer(model=tiny_model("gpt_neox"), args=args, train_dataset=data, callbacks=[BWSKCallback()]).train()
    assert strict_json(tmp_path / "training_results.json")["precision"] == expected


# -- 5. errors before any work -------------------------------------------------------------------------------

def test_a_budget_below_the_minimum_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BWSKError) as caught:
        run_in_process(out, "--modes", "reversible", "--bwsk_memory_budget", "1KB")
    message = str(caught.value)
    # 2 layers x batch 8 x 32 tokens x width 64 x 4 bytes enter the decoder layers of the tiny GPT-NeoX.
    assert f"below the minimum {2 * 8 * 32 * 64 * 4:,} bytes" in message and "\n" not in message, message
    assert not out.exists(), "nothing may be written before every check passed"


def test_an_activation_budget_below_the_layer_inputs_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BWSKError) as caught:
        run_in_process(out, "--modes", "reversible", "--bwsk_activation_budget", "1KB")
    message = str(caught.value)
    assert message.startswith("--bwsk_activation_budget") and f"below the minimum {2 * 8 * 32 * 64 * 4:,} bytes" in message
    assert "\n" not in message and not out.exists(), message


def test_a_budget_below_the_whole_step_floor_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BWSKError) as caught:
        # Above the decoder-layer inputs (262,144 B), below weights + gradients + AdamW state of the tiny model.
        run_in_process(out, "--modes", "reversible", "--bwsk_memory_budget", "1MB")
    message = str(caught.value)
    assert "below the minimum whole-step peak" in message and "\n" not in message, message
    assert not out.exists(), "nothing may be written before every check passed"


def test_too_short_data_leaves_the_output_dir_as_it_was_and_the_fix_reruns(tmp_path):
    from hf_bwsk.experiments.data import SPLITS

    files = {split: tmp_path / f"{split}.txt" for split in SPLITS}
    for split, path in files.items():
        path.write_text("A long enough text for training. " * 100 if split != "train" else "Too short.\n")
    flags = [item for split in SPLITS for item in (f"--{split}_file", str(files[split]))]
    out = tmp_path / "out"
    with pytest.raises(BWSKError, match="the train text has \\d+ tokens"):
        run_in_process(out, *flags)
    assert not out.exists(), "a run refused before training leaves no directory behind"
    RunDirectory(out).check({}, resume=False, overwrite=False)  # the corrected rerun is not refused


@pytest.mark.parametrize("flags, message", [
    (["--modes", "conventional", "--bwsk_mode", "reversible"], "--bwsk_mode is set per variant by the runner"),
    (["--modes", "conventional", "--bwsk_memory_budget", "1GB"], "--bwsk_memory_budget applies to the reversible"),
])
def test_contradicting_flags_are_refused_before_any_work(tmp_path, flags, message):
    with pytest.raises(BWSKError, match=message) as caught:
        run_in_process(tmp_path / "out", *flags)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


# -- 6. friction -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_user_is_told_what_trains_and_where_it_went_without_spurious_warnings(diverged_run):
    out, process = diverged_run
    for number, name in enumerate(VARIANTS, start=1):
        assert f"[{number}/4] training {name}" in process.stdout, process.stdout[-2000:]
    variants_line = next(line for line in process.stdout.splitlines() if line.startswith("Variants: "))
    assert all(str(out / name) in variants_line for name in VARIANTS), variants_line
    assert "unexpected keys" not in process.stdout + process.stderr


@pytest.mark.slow
def test_card_analysis_is_the_variants_analysis(clean_run):
    out, _ = clean_run
    results = strict_json(out / "results.json")
    for name in ("finetune-bwsk-analyzed", "scratch-bwsk-analyzed"):
        assert strict_json(out / name / "training_results.json")["analysis"] == results["analysis"], name
    assert results["analysis"]["seq_len"] == 32 and results["analysis"]["batch_size"] == 1


def test_help_and_usage_errors_import_nothing_heavy():
    probe = ("import sys\nfrom hf_bwsk.cli import main\nfor argv in (['--help'], ['push']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    process = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ)
    assert "HEAVY []" in process.stdout, process.stdout + process.stderr
    assert "``" not in process.stdout and "hf-bwsk: S/K analysis" in process.stdout
    assert process.stderr.strip().count("\n") == 0 and "hf-bwsk push: error:" in process.stderr


def test_a_recipe_flag_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(TEST_PRESETS, ["--no_such_flag", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--no_such_flag" in err, err


def test_the_memory_column_says_what_it_measured():
    from hf_bwsk.formatting import results_table

    record = {"mode": "conventional", "peak_memory_mb": 3.0, "peak_memory_kind": "cpu_bytes_kept_for_backward"}
    header = results_table([record]).splitlines()[0]
    assert "Peak Memory" not in header and "Memory: bytes kept for backward after one forward (CPU" in header
    for peak_kind in ("cuda_max_allocated", "cpu_whole_step_peak"):
        peak = {**record, "peak_memory_kind": peak_kind}
        assert "| Peak Memory |" in results_table([peak]).splitlines()[0]


def test_a_403_says_the_token_lacks_write_access(fake_run_dir, hf_home, hub):
    from hub_server import TOKEN

    from hf_bwsk.publishing.hub import push

    with pytest.raises(BWSKError) as caught:
        push(fake_run_dir, "someone-else/run", token=TOKEN)
    message = str(caught.value)
    assert "403" in message and "lacks write access" in message and "run the push again" not in message, message


# -- the kill -9 ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_in_a_variant_then_resume_gives_the_uninterrupted_results(clean_run, tmp_path):
    expected_out, _ = clean_run
    out = tmp_path / "out"
    victim = out / "checkpoints" / "finetune-bwsk-analyzed"
    process = subprocess.Popen(recipe_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=os.environ)
    deadline = time.monotonic() + 300
    # A checkpoint is complete once our bookkeeping file is in it (written after Trainer's files).
    while not list(victim.glob("checkpoint-*/bwsk_session_time.json")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "finetune-bwsk-analyzed" / "training_results.json").exists(), "killed too late"
    assert json.loads((out / LOCK).read_text())["pid"] == process.pid, "the killed run held the lock"
    first_session = max(json.loads(path.read_text())["wall_time_s"]
                        for path in victim.glob("checkpoint-*/bwsk_session_time.json"))
    resumed = run_recipe(out, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / LOCK).exists(), "its lock file, left by the kill, went with the resumed run's release"
    assert "[2/4] training finetune-bwsk-analyzed (resuming from checkpoint-" in resumed.stdout
    assert "unexpected keys" not in resumed.stdout + resumed.stderr
    found, expected = records(out), records(expected_out)
    for name in VARIANTS:
        same_records(found[name], expected[name], name)
    assert found["finetune-bwsk-analyzed"]["resumed"] is True
    assert found["finetune-conventional"]["resumed"] is False
    assert found["finetune-bwsk-analyzed"]["wall_time_s"] > first_session, "the time of both sessions counts"

"""The experiment runner: flags and presets, output-directory rules, and the six-variant grid end to end.

The grid runs once per session on a smaller tiny preset (the real one is the README's main job),
and several tests read it. Determinism and resuming are checked against it.
"""

import dataclasses
import json
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_bwsk.errors import BWSKError
from hf_bwsk.experiments.args import parse_arguments
from hf_bwsk.experiments.data import SPLITS, TinyCorpus
from hf_bwsk.experiments.presets import MAMBA_PRESETS, PYTHIA_PRESETS, get_preset
from hf_bwsk.experiments.run_dir import RunDirectory
from hf_bwsk.layout import MARKER, VARIANTS
from hf_bwsk.publishing.results import format_tables, memory_saving
from hf_bwsk.recipe import run_experiment

TEST_PRESETS = {
    "tiny": dataclasses.replace(
        PYTHIA_PRESETS["tiny"], data=TinyCorpus(max_chars=30_000), block_size=32, max_epochs=2, logging_steps=5
    ),
    "full": PYTHIA_PRESETS["full"],
}
# Run to run, only these differ (docs/RESULTS_FORMAT.md: wall time, what is derived from it, and the
# flag saying a variant's time spans sessions).
WALL_CLOCK_FIELDS = {"wall_time_s", "tokens_per_s", "resumed"}


def run(output_dir, *flags, presets=TEST_PRESETS, callbacks=()):
    args, training_args = parse_arguments(presets, ["--output_dir", str(output_dir), "--disable_tqdm", "true", *flags])
    return run_experiment(get_preset(presets, args.preset), args, training_args, callbacks=callbacks)


def without_wall_clock(record: dict) -> dict:
    record = {key: value for key, value in record.items() if key not in WALL_CLOCK_FIELDS}
    if record.get("reversible"):
        # The plan's hit/miss counters count the ops of the session that wrote the record.
        record["reversible"] = {key: value for key, value in record["reversible"].items() if key != "plan_fidelity"}
    return record


def assert_same_record(actual: dict, expected: dict, what: str):
    actual, expected = without_wall_clock(actual), without_wall_clock(expected)
    differing = sorted(key for key in actual.keys() | expected.keys() if actual.get(key) != expected.get(key))
    assert not differing, f"{what}: fields differ: " + "; ".join(
        f"{key}: {str(actual.get(key))[:120]} != {str(expected.get(key))[:120]}" for key in differing)


# -- flags and presets ---------------------------------------------------------------------------

def test_preset_supplies_the_published_defaults(tmp_path):
    args, training_args = parse_arguments(MAMBA_PRESETS, ["--preset", "full", "--output_dir", str(tmp_path)])
    assert (args.preset, args.modes, args.experiments) == ("full", ["conventional", "analyzed", "reversible"],
                                                           ["finetune", "scratch"])
    assert training_args.per_device_train_batch_size == 2 and training_args.learning_rate == 3e-5
    assert str(training_args.lr_scheduler_type.value) == "cosine" and training_args.max_grad_norm == 1.0
    assert training_args.optim.value == "adamw_torch"
    assert training_args.eval_strategy.value == "epoch" and training_args.load_best_model_at_end
    assert training_args.metric_for_best_model == "eval_loss" and not training_args.greater_is_better
    assert training_args.fp16 == torch.cuda.is_available()
    assert args.early_stopping_patience == 3


def test_flags_override_the_preset(tmp_path):
    args, training_args = parse_arguments(PYTHIA_PRESETS, [
        "--preset", "tiny", "--output_dir", str(tmp_path), "--learning_rate", "1e-3", "--per_device_train_batch_size",
        "4", "--modes", "reversible,bwsk-analyzed", "--experiments", "finetune", "--max_epochs", "5", "--seed", "7"])
    assert training_args.learning_rate == 1e-3 and training_args.per_device_train_batch_size == 4
    assert args.modes == ["reversible", "analyzed"] and args.experiments == ["finetune"]
    assert args.max_epochs == 5 and training_args.seed == 7


def test_yaml_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: full\noutput_dir: {tmp_path / 'out'}\nmodes: [conventional]\nseed: 3\n"
                      "scratch_learning_rate: 0.001\n")
    args, training_args = parse_arguments(PYTHIA_PRESETS, [str(config)])
    assert args.preset == "full" and args.modes == ["conventional"] and args.scratch_learning_rate == 1e-3
    assert training_args.seed == 3 and training_args.per_device_train_batch_size == 8
    assert training_args.learning_rate == 5e-5


@pytest.mark.parametrize("flags, modes, experiments", [
    (["--modes", "conventional", "reversible", "--experiments", "scratch", "finetune"],
     ["conventional", "reversible"], ["scratch", "finetune"]),
    (["--modes", "conventional,bwsk-reversible", "--experiments", "finetune,scratch"],
     ["conventional", "reversible"], ["finetune", "scratch"]),
    (["--modes", "bwsk-analyzed,conventional", "reversible", "analyzed", "--experiments=scratch"],
     ["analyzed", "conventional", "reversible"], ["scratch"]),
], ids=["space-separated", "comma-separated", "mixed"])
def test_list_flags_take_values_as_hf_users_type_them(tmp_path, flags, modes, experiments):
    args, _ = parse_arguments(PYTHIA_PRESETS, ["--output_dir", str(tmp_path), *flags])
    assert (args.modes, args.experiments) == (modes, experiments)


@pytest.mark.parametrize("flags", [
    ["--experiments", "scratch", "--learning_rate", "1e-3"],
    ["--experiments", "scratch", "--learning-rate=5e-4"],  # the preset's own value, another spelling: still given
], ids=["given", "given-as-the-default"])
def test_a_learning_rate_no_variant_uses_is_refused_naming_the_scratch_one(tmp_path, flags):
    with pytest.raises(BWSKError) as caught:
        parse_arguments(PYTHIA_PRESETS, ["--output_dir", str(tmp_path), *flags])
    message = str(caught.value)
    assert message.startswith("--learning_rate sets the fine-tune variants'") and "\n" not in message, message
    assert "--scratch_learning_rate" in message


@pytest.mark.parametrize("flags", [
    ["--experiments", "scratch", "--learning_rate", "1e-3", "--scratch_learning_rate", "1e-2"],
    ["--experiments", "scratch", "finetune", "--learning_rate", "1e-3"],
    ["--learning_rate", "1e-3"],
    ["--experiments", "scratch"],
], ids=["with-scratch-rate", "with-finetune", "every-experiment", "no-learning-rate"])
def test_a_learning_rate_a_variant_uses_is_taken(tmp_path, flags):
    args, training_args = parse_arguments(PYTHIA_PRESETS, ["--output_dir", str(tmp_path), *flags])
    assert training_args.learning_rate == (1e-3 if "--learning_rate" in flags else 5e-4)


def test_a_yaml_learning_rate_no_variant_uses_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nexperiments: scratch\nlearning_rate: 0.001\n")
    with pytest.raises(BWSKError, match="--scratch_learning_rate"):
        parse_arguments(PYTHIA_PRESETS, [str(config)])


@pytest.mark.parametrize("flags, message", [
    (["--preset", "huge"], "unknown preset 'huge'; valid presets: full, tiny"),
    (["--modes", "conventional,fast"], "unknown fast; valid values: conventional, analyzed, reversible"),
    (["--modes", "conventional", "fast", "slow"], "unknown fast, slow; valid values: conventional, analyzed"),
    (["--modes", ","], "unknown empty list; valid values: conventional, analyzed, reversible"),
    (["--experiments", "pretrain"], "unknown pretrain; valid values: finetune, scratch"),
    (["--experiments"], "argument --experiments: expected at least one argument"),
    (["--train_file", "a.txt"], "add --validation_file, --test_file"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(BWSKError) as caught:
        parse_arguments(PYTHIA_PRESETS, ["--output_dir", str(tmp_path), *flags])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_push_needs_a_repo_id_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BWSKError, match="--push_to_hub needs --hub_repo_id"):
        run(out, "--push_to_hub", "true")
    assert not out.exists()


# -- output directory rules ----------------------------------------------------------------------

IDENTITY = {"recipe": "pythia-tiny", "preset": "tiny", "seed": 42}


def test_foreign_output_dir_is_refused_unless_overwriting(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run_dir = RunDirectory(tmp_path)
    with pytest.raises(BWSKError, match=r"holds files this runner did not write \(notes.txt\)"):
        run_dir.check(IDENTITY, resume=False, overwrite=False)
    run_dir.check(IDENTITY, resume=False, overwrite=True)
    run_dir.prepare(IDENTITY, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine", "overwriting must keep files the runner did not write"
    assert json.loads((tmp_path / MARKER).read_text()) == {"identity": IDENTITY, "written": []}


def test_earlier_run_needs_resume_or_overwrite(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.prepare(IDENTITY, overwrite=False)
    (tmp_path / VARIANTS[0]).mkdir()
    (tmp_path / VARIANTS[0] / "training_results.json").write_text("{}")
    run_dir.record([tmp_path / VARIANTS[0] / "training_results.json"])
    (tmp_path / f".{VARIANTS[1]}.partial").mkdir()
    with pytest.raises(BWSKError, match="holds an earlier run; pass --resume to continue it or --overwrite_output_dir"):
        run_dir.check(IDENTITY, resume=False, overwrite=False)
    with pytest.raises(BWSKError, match=r"--resume with other settings .*: seed 42 \(run\) vs 1 \(now\)"):
        run_dir.check({**IDENTITY, "seed": 1}, resume=True, overwrite=False)
    run_dir.check(IDENTITY, resume=True, overwrite=False)
    run_dir.prepare(IDENTITY, overwrite=False)
    assert run_dir.finished(VARIANTS[0]), "resuming keeps finished variants"
    assert not run_dir.partial(VARIANTS[1]).exists(), "a half-written variant folder is removed"
    run_dir.prepare(IDENTITY, overwrite=True)
    assert not run_dir.variant(VARIANTS[0]).exists(), "overwriting removes the earlier run's outputs"


def test_unreachable_hub_fails_in_one_line_before_training(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(BWSKError) as caught:
        run(tmp_path / "out", "--preset", "full")
    message = str(caught.value)
    assert "\n" not in message and "EleutherAI/pythia-70m" in message and "--preset tiny works offline" in message
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_too_short_text_files_fail_before_training(tmp_path):
    files = {}
    for split in SPLITS:
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_text("A long enough text for training. " * 100 if split != "test" else "Too short.\n")
    out = tmp_path / "out"
    with pytest.raises(BWSKError, match="the test text has \\d+ tokens but one block of block_size 32 needs 32"):
        run(out, *[item for split in SPLITS for item in (f"--{split}_file", str(files[split]))])
    assert not out.exists(), "a run refused before training writes nothing (not even the tiny corpus)"


# -- tables ----------------------------------------------------------------------------------------

def test_tables_show_each_experiment_and_the_memory_saving():
    def record(experiment, mode, peak):
        return {"experiment": experiment, "mode": mode, "final_train_loss": 3.21, "best_val_metric": 25.0,
                "test_metric": 26.5, "peak_memory_mb": peak, "peak_memory_kind": "cuda_max_allocated",
                "wall_time_s": 90.0, "epochs_completed": 4.0, "early_stopped": True}

    runs = [record(e, m, p) for e in ("finetune", "scratch")
            for m, p in (("conventional", 4000.0), ("analyzed", 4000.0), ("reversible", 3000.0))]
    results = {"model_name": "Pythia-70M", "preset": "full", "runs": runs}
    assert memory_saving(runs, "finetune") == pytest.approx(0.25)
    table = format_tables(results)
    assert "| Mode | Final Loss | Val Perplexity | Test Perplexity | Peak Memory | Activations Kept | Time | Epochs |" in table
    assert table.count("| BWSK Reversible | 3.2100 | 25.00 | 26.50 | 2.93 GB | n/a | 1.5 min | 4 (early stop) |") == 2
    assert "### Fine-tune" in table and "### From Scratch" in table
    assert table.count("3.91 GB -> 2.93 GB (25.0% saved") == 2


# -- the grid, end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def grid(tmp_path_factory):
    """All six variants of the test-size tiny preset, run once."""
    out = tmp_path_factory.mktemp("grid")
    return out, run(out)


@pytest.mark.slow
def test_grid_layout(grid):
    out, _ = grid
    visible = sorted(path.name for path in out.iterdir() if not path.name.startswith("."))
    assert visible == sorted([*VARIANTS, "checkpoints", "results.json"])
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == [MARKER]
    for name in VARIANTS:
        files = sorted(path.name for path in (out / name).iterdir())
        for needed in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                       "training_results.json"):
            assert needed in files, f"{name} lacks {needed}: {files}"
        assert not [f for f in files if f.startswith("checkpoint") or f.endswith((".bin", ".pt", ".pth"))], files
        assert list((out / "checkpoints" / name).glob("checkpoint-*")), f"no checkpoints kept for {name}"


@pytest.mark.slow
def test_grid_records(grid):
    out, results = grid
    assert json.loads((out / "results.json").read_text()) == results
    assert results["slug"] == "pythia-tiny" and results["preset"] == "tiny" and results["seed"] == 42
    assert results["arch_family"] == "transformer" and results["params_m"] > 0
    assert results["s_ratio"] + results["k_ratio"] + results["gray_ratio"] == pytest.approx(1)
    assert results["versions"]["torch"] == torch.__version__ and results["device"]
    assert results["dataset"]["source"] == "pydoc_data.topics" and results["dataset"]["train_blocks"] > 0
    assert results["hyperparameters"]["scratch_learning_rate"] == 2e-3
    assert [(run["experiment"], run["mode"]) for run in results["runs"]] == [
        (e, m) for e in ("finetune", "scratch") for m in ("conventional", "analyzed", "reversible")]
    for run_record in results["runs"]:
        name = run_record["variant"]
        assert json.loads((out / name / "training_results.json").read_text()) == run_record
        assert run_record["model_slug"] == "pythia-tiny" and run_record["seed"] == 42
        assert math.isfinite(run_record["test_metric"]) and math.isfinite(run_record["best_val_metric"]), name
        assert run_record["test_metric"] == pytest.approx(math.exp(run_record["test_loss"]))
        losses = [point["loss"] for point in run_record["loss_curve"]]
        assert losses[-1] < losses[0], f"{name}: training loss did not fall: {losses}"
        assert run_record["total_steps"] > 0 and run_record["epochs_completed"] == 2
        assert run_record["peak_memory_mb"] > 0 and run_record["nan_count"] == 0
        expected_lr = 5e-4 if run_record["experiment"] == "finetune" else 2e-3
        assert run_record["hyperparameters"]["learning_rate"] == expected_lr
    finetune, scratch = (next(r for r in results["runs"] if r["variant"] == v)
                         for v in ("finetune-conventional", "scratch-conventional"))
    assert finetune["test_metric"] < scratch["test_metric"], "the pretrained base should give fine-tuning a head start"


@pytest.mark.slow
def test_saved_variant_loads_and_test_perplexity_is_token_weighted(grid):
    """The published folder loads with subfolder=, and its test perplexity is exp of the mean NLL of
    every predicted token of the packed test split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_bwsk.experiments.data import load_text_files, pack_blocks

    out, results = grid
    name = "finetune-bwsk-reversible"
    model = AutoModelForCausalLM.from_pretrained(out, subfolder=name).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, subfolder=name)
    test_file = str(out / "checkpoints" / "tiny-corpus" / "test.txt")
    blocks = pack_blocks(load_text_files({"test": test_file}, 32), tokenizer, 32)["test"]
    total_nll, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), 16):
            input_ids = torch.tensor(blocks["input_ids"][start:start + 16])
            logits = model(input_ids=input_ids).logits[:, :-1]
            targets = input_ids[:, 1:]
            total_nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            tokens += targets.numel()
    record = next(run for run in results["runs"] if run["variant"] == name)
    assert math.exp(total_nll / tokens) == pytest.approx(record["test_metric"], rel=1e-4)
    best = min(point["loss"] for point in record["val_curve"])
    assert record["best_val_loss"] == pytest.approx(best)


@pytest.mark.slow
def test_a_given_base_model_and_local_text_files(grid, tmp_path):
    """The full preset's path (a ready base model, no tiny corpus) with --base_model and --*_file."""
    out, _ = grid
    base = out / "checkpoints" / "tiny-base"
    files = [item for split in SPLITS for item in (f"--{split}_file", str(out / "checkpoints" / "tiny-corpus" /
                                                                          f"{split}.txt"))]
    results = run(tmp_path / "run", "--preset", "full", "--base_model", str(base), *files, "--block_size", "32",
                  "--max_epochs", "1", "--experiments", "finetune", "--modes", "conventional", "--learning_rate",
                  "5e-4", "--logging_steps", "2", "--per_device_train_batch_size", "8", "--torch_threads", "1")
    assert (results["model_name"], results["hf_id"], results["preset"]) == ("tiny-base", None, "full")
    assert results["hyperparameters"]["base_model"] == str(base)
    assert results["dataset"]["source"] == "local" and results["dataset"]["files"]["test"].endswith("test.txt")
    assert not (tmp_path / "run" / "checkpoints" / "tiny-corpus").exists(), "no tiny corpus when none is needed"
    losses = [point["loss"] for point in results["runs"][0]["loss_curve"]]
    assert losses[-1] < losses[0], losses
    saved = (tmp_path / "run" / "finetune-conventional" / "tokenizer.json").read_text()
    assert saved == (base / "tokenizer.json").read_text(), "every variant ships the base model's tokenizer"


@pytest.mark.slow
def test_early_stopping_ends_a_variant_that_stops_improving(tmp_path):
    # A zero learning rate keeps the weights, hence the validation loss, exactly as they were.
    results = run(tmp_path, "--experiments", "scratch", "--modes", "conventional", "--scratch_learning_rate", "0",
                  "--max_epochs", "5", "--early_stopping_patience", "1")
    record = results["runs"][0]
    assert [point["epoch"] for point in record["val_curve"]] == [1, 2], record["val_curve"]
    assert record["early_stopped"] and record["epochs_completed"] == 2
    assert record["hyperparameters"]["learning_rate"] == 0 and results["hyperparameters"]["max_epochs"] == 5


class Interrupt(TrainerCallback):
    """Stops one variant mid-training, after its first checkpoint, as a kill would."""

    def __init__(self, variant: str, at_step: int):
        self.variant, self.at_step = variant, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.variant) and state.global_step == self.at_step:
            raise KeyboardInterrupt(f"interrupted {self.variant} at step {state.global_step}")


class TrainStarts(TrainerCallback):
    """Where each trainer of a run started: (variant checkpoint folder, first step)."""

    def __init__(self):
        self.starts = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.starts.append((args.output_dir.rsplit("/", 1)[-1], state.global_step))


@pytest.fixture(scope="session")
def resumed(grid, tmp_path_factory):
    """A from-scratch run interrupted in its second variant, then resumed; plus what happened in between."""
    _, results = grid
    steps_per_epoch = next(r for r in results["runs"] if r["variant"] == "scratch-conventional")["total_steps"] // 2
    out = tmp_path_factory.mktemp("resumed")
    flags = ("--experiments", "scratch", "--modes", "conventional,reversible")
    with pytest.raises(KeyboardInterrupt):
        run(out, *flags, callbacks=(Interrupt("scratch-bwsk-reversible", steps_per_epoch + 2),))
    finished_first = (out / "scratch-conventional" / "training_results.json").read_text()
    left = {"reversible_published": (out / "scratch-bwsk-reversible").exists(),
            "checkpoints": sorted(p.name for p in (out / "checkpoints" / "scratch-bwsk-reversible").iterdir())}
    with pytest.raises(BWSKError, match="pass --resume"):
        run(out, *flags)
    starts = TrainStarts()
    results = run(out, *flags, "--resume", "true", callbacks=(starts,))
    left["starts"], left["steps_per_epoch"] = starts.starts, steps_per_epoch
    return out, results, finished_first, left


@pytest.mark.slow
def test_same_seed_gives_the_same_results(grid, resumed):
    _, grid_results = grid
    _, results, _, _ = resumed
    expected = next(r for r in grid_results["runs"] if r["variant"] == "scratch-conventional")
    assert_same_record(results["runs"][0], expected, "scratch-conventional, run twice")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_results(grid, resumed):
    _, grid_results = grid
    out, results, finished_first, left = resumed
    assert not left["reversible_published"], "an interrupted variant must not be published"
    assert [name for name in left["checkpoints"] if name.startswith("checkpoint-")], left["checkpoints"]
    assert (out / "scratch-conventional" / "training_results.json").read_text() == finished_first, (
        "resuming must skip the finished variant")
    assert left["starts"] == [("scratch-bwsk-reversible", left["steps_per_epoch"])], (
        "only the interrupted variant trains again, from its last checkpoint")
    expected = next(r for r in grid_results["runs"] if r["variant"] == "scratch-bwsk-reversible")
    assert_same_record(results["runs"][1], expected, "scratch-bwsk-reversible, interrupted and resumed")


# -- publishing ------------------------------------------------------------------------------------

HUB_TOKEN = "hf_test_write_token_0123456789"
# huggingface_hub's LFS upload hands httpx2 a file object through ``data=``; httpx2 asks for ``content=``.
tolerate_httpx_upload_warning = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning:httpx2")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from hub_server import HubServer, point_hf_at

    with HubServer({HUB_TOKEN: "tester"}) as server:
        point_hf_at(server, monkeypatch, tmp_path / "hf_home")
        yield server


@tolerate_httpx_upload_warning
def test_rejected_token_stops_a_push_run_before_any_work(hub, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BWSKError, match="token was rejected"):
        run(out, "--push_to_hub", "true", "--hub_repo_id", "tester/grid", "--hub_token", "hf_wrong")
    assert not out.exists()


@pytest.mark.slow
@tolerate_httpx_upload_warning
def test_push_publishes_the_grid_as_one_commit(grid, hub, tmp_path):
    """--push_to_hub: one commit of the six variants, card and results at the end; no variant pushes alone."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(grid[0], out)
    run(out, "--resume", "true", "--push_to_hub", "true", "--hub_repo_id", "tester/grid", "--hub_token", HUB_TOKEN)
    assert hub.commit_count("tester/grid") == 2, "the repo's initial commit plus one commit holding everything"
    remote = sorted(hub.files("tester/grid"))
    assert {"README.md", "results.json"} <= set(remote)
    for name in VARIANTS:
        assert f"{name}/model.safetensors" in remote and f"{name}/training_results.json" in remote
    assert not [path for path in remote if path.startswith("checkpoints/") or path.endswith(".bin")], remote
    assert sorted(repo for repo in hub.state.repos) == ["tester/grid"], "a variant's Trainer pushed on its own"

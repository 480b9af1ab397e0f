"""Cards rendered from a tiny run: front matter read back by huggingface_hub, numbers, n/a, idempotence."""

import json
import shutil
import subprocess
import sys

import pytest
from fake_run import VARIANTS, make_fake_run
from huggingface_hub import ModelCard

from hf_bwsk.errors import BWSKError
from hf_bwsk.layout import variant_label
from hf_bwsk.publishing.cards import render_card, write_card
from hf_bwsk.publishing.run import load_run
from hf_bwsk.training.model_card import render_variant_card

LABELS = [variant_label(e, m) for e in ("finetune", "scratch") for m in ("conventional", "analyzed", "reversible")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy to edit, so one test's changes never leak into another's run."""
    return shutil.copytree(run_dir, tmp_path / "run")


def edit_results(folder, **changes):
    path = folder / "training_results.json"
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))
    return record


def table_row(card, title, mode):
    section = card.split(f"## {title}")[1]
    return next(line for line in section.splitlines() if line.startswith(f"| {mode} |"))


def test_card_front_matter_reads_back_as_six_separate_results(run_copy):
    readme = write_card(run_copy, repo_id="tester/bwsk-tiny")
    card = ModelCard.load(readme)
    records = [json.loads((run_copy / v / "training_results.json").read_text()) for v in VARIANTS]

    results = card.data.eval_results
    assert [r.task_name for r in results] == LABELS
    assert [r.metric_value for r in results] == [r["test_metric"] for r in records]
    assert {(r.task_type, r.dataset_type, r.metric_type, r.verified) for r in results} == {
        ("text-generation", "wikitext", "perplexity", False)
    }
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation" and card.data.datasets == ["wikitext"]
    assert card.data.base_model == "hf-bwsk/tiny-gpt-neox" and card.data.metrics == ["perplexity"]
    assert card.data.tags == ["bwsk", "combinator-analysis", "transformer", "reversible-backprop",
                              "convergence-training"]
    assert (run_copy / "plots" / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert (run_copy / "plots" / "peak_memory.png").read_bytes().startswith(b"\x89PNG")


def test_card_body_shows_every_number_from_the_results(run_dir):
    card = render_card(run_dir, repo_id="tester/bwsk-tiny")
    run = load_run(run_dir)
    for experiment, title in (("finetune", "Fine-tune results"), ("scratch", "From Scratch results")):
        for mode, label in (("conventional", "Conventional"), ("reversible", "BWSK Reversible")):
            r = run.variant(experiment, mode)
            expected = (f"| {label} | {r['final_train_loss']:.4f} | {r['best_val_metric']:.2f} | "
                        f"{r['test_metric']:.2f} | {r['peak_memory_mb']:.1f} MB | {r['activation_memory_mb']:.1f} MB | "
                        f"{r['wall_time_s']:.1f} s | 3 |")
            assert table_row(card, title, label) == expected
    assert ("Measured on cpu (fp32). Peak memory: whole-step peak, live storages on CPU (weights, gradients, "
            "optimizer state, activations); Activations Kept: activations kept for backward after the forward.") in card
    assert "| Fine-tune | 40.0 MB | 9.5 MB | 76.2% |" in card  # 1 - 9.5 / 40
    assert ("BWSK Reversible mode status: active; loss: fused_linear_cross_entropy; recomputed in backward: "
            "`mlp.dense_h_to_4h:aten.addmm.default` x2; neither kept nor recomputed (output read by nothing "
            "backward needs): `mlp.dense_4h_to_h:aten.addmm.default` x2; recompute FLOPs fraction: 0.250; the fused loss's "
            "weight-gradient buffer (16.0 KB, the `.grad` backward allocates anyway)") in card
    assert "| S | 110 | 55.0% | 50.0% | 62.0% | 67.8% |" in card
    assert 'from_pretrained(repo, subfolder="finetune-conventional")' in card and 'repo = "tester/bwsk-tiny"' in card
    assert "| learning_rate | 5e-05 | 0.0003 |" in card
    assert "![Training and validation loss of the six variants](plots/loss_curves.png)" in card


def test_card_shows_device_and_precision_the_run_used(tmp_path):
    run_dir = make_fake_run(tmp_path / "gpu", device="cuda:NVIDIA H100 80GB HBM3", precision="bf16")
    for variant in VARIANTS:
        edit_results(run_dir / variant, peak_memory_kind="cuda_max_allocated", peak_memory_mb=2048.0)
    card = render_card(run_dir)
    assert ("Measured on cuda:NVIDIA H100 80GB HBM3 (bf16). Peak memory: whole-step peak, CUDA max allocated "
            "(weights, gradients, optimizer state, activations);") in card
    assert "| Conventional | " in card and " 2.00 GB |" in card
    assert "| Fine-tune | 2.00 GB | 2.00 GB | 0.0% |" in card


def test_unmeasured_values_are_na_and_left_out_of_the_model_index(run_copy):
    edit_results(run_copy / "scratch-bwsk-analyzed", test_metric=None, test_loss=None)
    edit_results(run_copy / "finetune-bwsk-reversible", peak_memory_mb=None, activation_memory_mb=None,
                 bytes_kept_for_backward=None, wall_time_s=None)
    results = json.loads((run_copy / "results.json").read_text())
    del results["analysis"]
    (run_copy / "results.json").write_text(json.dumps(results))

    card_text = render_card(run_copy)
    row = table_row(card_text, "From Scratch results", "BWSK Analyzed")
    assert row.split(" | ")[3] == "n/a"  # test perplexity
    row = table_row(card_text, "Fine-tune results", "BWSK Reversible")
    assert row.split(" | ")[4:7] == ["n/a", "n/a", "n/a"]  # peak memory, activations kept, time
    assert "| Fine-tune | 40.0 MB | n/a | n/a |" in card_text
    assert "This run recorded no S/K analysis (n/a)." in card_text

    (run_copy / "README.md").write_text(card_text)
    names = [r.task_name for r in ModelCard.load(run_copy / "README.md").data.eval_results]
    assert names == [label for label in LABELS if label != "From Scratch (BWSK Analyzed)"]


def test_rendering_is_idempotent(run_copy):
    first = {p: p.read_bytes() for p in [write_card(run_copy)] + sorted((run_copy / "plots").iterdir())}
    second = {p: p.read_bytes() for p in [write_card(run_copy)] + sorted((run_copy / "plots").iterdir())}
    assert first == second
    assert render_card(run_copy) == first[run_copy / "README.md"].decode()


def test_incomplete_or_mislabelled_variant_is_refused_by_name(run_copy):
    (run_copy / "scratch-bwsk-reversible" / "training_results.json").unlink()
    with pytest.raises(BWSKError, match="variant scratch-bwsk-reversible is incomplete"):
        render_card(run_copy)
    shutil.copy(run_copy / "scratch-conventional" / "training_results.json",
                run_copy / "scratch-bwsk-reversible" / "training_results.json")
    with pytest.raises(BWSKError, match="mode=conventional, not the folder scratch-bwsk-reversible"):
        render_card(run_copy)
    with pytest.raises(BWSKError, match="does not exist"):
        render_card(run_copy / "nowhere")


def test_variant_card_carries_its_one_result(run_dir):
    folder = run_dir / "finetune-bwsk-reversible"
    record = json.loads((folder / "training_results.json").read_text())
    dataset = {"source": "hub", "name": "wikitext", "config_name": "wikitext-2-raw-v1"}
    text = render_variant_card(folder, repo_id="tester/one", base_model="EleutherAI/pythia-70m", dataset=dataset)
    assert text == render_variant_card(folder, repo_id="tester/one", base_model="EleutherAI/pythia-70m",
                                       dataset=dataset)
    assert 'from_pretrained("tester/one")' in text and "BWSK Reversible mode status: active" in text

    path = folder.parent.parent / "variant_README.md"
    path.write_text(text)
    card = ModelCard.load(path)
    assert [(r.task_name, r.metric_value) for r in card.data.eval_results] == [
        ("Fine-tune (BWSK Reversible)", record["test_metric"])
    ]
    assert card.data.base_model == "EleutherAI/pythia-70m"

    path.write_text(render_variant_card(folder))  # no dataset known: no result can be claimed
    assert ModelCard.load(path).data.eval_results is None

    path.write_text(render_variant_card(folder, base_model=str(run_dir), dataset="wikitext"))
    card = ModelCard.load(path)
    assert card.data.base_model is None  # a local path is no Hub model id
    assert [(r.dataset_type, r.metric_value) for r in card.data.eval_results] == [("wikitext", record["test_metric"])]


def test_importing_the_package_stays_light():
    code = ("import sys, hf_bwsk, hf_bwsk.publishing, hf_bwsk.publishing.plots; "
            "print(sorted(m for m in ('datasets', 'evaluate', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_matplotlib_is_a_one_line_error(run_copy, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    with pytest.raises(BWSKError, match=r"pip install 'hf-bwsk\[plot\]'"):
        write_card(run_copy)
    assert not (run_copy / "README.md").exists()


def test_reversible_note_names_a_recomputed_loop_with_its_steps():
    from hf_bwsk.training.model_card import reversible_note

    plan = {"recomputed_ops": {"mixer:aten.bmm.default per step": 2, "mixer.in_proj:aten.mm.default": 2},
            "recomputed_loop_steps": {"mixer:aten.bmm.default per step": 31}, "recompute_flops_fraction": 0.1}
    note = reversible_note({"reversible": {"status": "active", "plan": plan}})
    assert "`mixer.in_proj:aten.mm.default` x2, `mixer:aten.bmm.default per step` x2 (loop of 31 steps)" in note, note

"""A realistic experiment run directory built from tiny models, in the runner's layout.

Layout and fields follow ``docs/RESULTS_FORMAT.md`` (contract F): ``results.json`` beside six variant
folders ``<experiment>-<mode>/`` holding ``model.safetensors``, ``config.json``,
``generation_config.json``, tokenizer files and ``training_results.json``; checkpoints live in
``checkpoints/`` and must never be published. Weights are random (one seed per variant, so the
variants differ); the curves and measurements are plausible, deterministic numbers, not a training
run: the card and Hub code only need the files, and building them takes about a second.
"""

import json
import math
from pathlib import Path

from tiny_models import VOCAB, tiny_model

from hf_bwsk.env import versions
from hf_bwsk.layout import EXPERIMENTS, MODES, VARIANTS, variant_name  # noqa: F401 (VARIANTS: for the tests)

SLUG = "tiny-gpt-neox"
HF_ID = "hf-bwsk/tiny-gpt-neox"


def tiny_tokenizer():
    """A byte-level BPE with exactly ``VOCAB`` tokens, trained offline on the stdlib's English prose."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<unk>"], limit_alphabet=100, show_progress=False
    )
    backend.train_from_iterator([topics[key] for key in sorted(topics)[:50]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )


def _hyperparameters(experiment):
    return {
        "learning_rate": 5e-5 if experiment == "finetune" else 3e-4, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "seq_len": 16, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
        "weight_decay": 0.01, "max_grad_norm": 1.0, "num_train_epochs": 3, "early_stopping_patience": 3,
        "optim": "adamw_torch",
    }


def training_results(experiment, mode, *, seed, device, precision, index):
    """One ``training_results.json`` object with every field of RESULTS_FORMAT.md."""
    start = 5.0 if experiment == "finetune" else 6.5
    rate = 0.05 + 0.01 * index
    loss_curve = [{"step": step, "loss": round(start * math.exp(-rate * step), 4)} for step in range(10, 70, 10)]
    val_curve = []
    for epoch, step in enumerate((20, 40, 60), start=1):
        loss = round(start * math.exp(-rate * step) + 0.1, 4)
        val_curve.append({"step": step, "epoch": float(epoch), "loss": loss, "perplexity": round(math.exp(loss), 4)})
    best = min(val_curve, key=lambda point: point["loss"])
    test_loss = round(best["loss"] + 0.02, 4)
    analysed = mode != "conventional"
    return {
        "model_slug": SLUG, "experiment": experiment, "mode": mode,
        "variant": variant_name(experiment, mode),
        "final_train_loss": loss_curve[-1]["loss"],
        "best_val_metric": best["perplexity"], "best_val_loss": best["loss"],
        "test_metric": round(math.exp(test_loss), 4), "test_loss": test_loss, "metric_name": "perplexity",
        "epochs_completed": 3.0, "total_steps": 60, "early_stopped": False,
        "wall_time_s": 12.5 + index, "tokens_per_s": 1500.0 - 10 * index,
        "peak_memory_mb": 40.0 if mode != "reversible" else 9.5,
        "peak_memory_kind": "cpu_whole_step_peak",
        "activation_memory_mb": 30.0 if mode != "reversible" else 2.5,
        "loss_curve": loss_curve, "val_curve": val_curve, "nan_count": 0,
        "seed": seed, "device": device, "precision": precision,
        "s_ratio": 0.55 if analysed else None, "k_ratio": 0.3 if analysed else None,
        "gray_ratio": 0.15 if analysed else None,
        "bytes_kept_for_backward": {
            "activation_bytes": int((40.0 if mode != "reversible" else 9.5) * 2**20),
            "grad_buffer_bytes": 16384 if mode == "reversible" else 0,
        },
        "reversible": {
            "status": "active", "reason": None, "decoder_layers": "gpt_neox.layers", "num_layers": 2,
            "loss": "fused_linear_cross_entropy", "loss_chunk_size": 1024,
            "plan": {"policy": "analysis", "recompute_flops_fraction": 0.25,
                     "recomputed_ops": {"mlp.dense_h_to_4h:aten.addmm.default": 2},
                     "skipped_ops": {"mlp.dense_4h_to_h:aten.addmm.default": 2}},
        } if mode == "reversible" else None,
        "versions": versions(), "hyperparameters": _hyperparameters(experiment),
    }


def analysis_summary():
    """The S/K report summary the runner stores in results.json (``SKReport.summary()``)."""
    return {
        "granularity": "op",
        "ratios": {
            "count": {"S": 0.55, "K": 0.3, "Gray": 0.15},
            "bytes": {"S": 0.5, "K": 0.35, "Gray": 0.15},
            "flops": {"S": 0.62, "K": 0.08, "Gray": 0.3},
        },
        "op_counts": {"S": 110, "K": 60, "Gray": 30},
        "auxiliary_ops": 41, "skipped_identities": 16, "unclassified": [],
        "module_view": {"S": 0.678, "K": 0.322, "Gray": 0.0},
        "module_view_counts": {"S": 40, "K": 19, "Gray": 0},
        "seq_len": 16, "batch_size": 2, "device": "meta", "dtype": "float32",
    }


def make_fake_run(root, *, seed=0, device="cpu", precision="fp32", with_checkpoint=True):
    """Write a complete six-variant run into ``root`` and return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    runs = []
    for index, (experiment, mode) in enumerate((e, m) for e in EXPERIMENTS for m in MODES):
        folder = root / variant_name(experiment, mode)
        model = tiny_model("gpt_neox", seed=seed + index)
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        result = training_results(experiment, mode, seed=seed, device=device, precision=precision, index=index)
        (folder / "training_results.json").write_text(json.dumps(result, indent=2))
        runs.append(result)
    if with_checkpoint:
        checkpoint = root / "checkpoints" / "finetune-conventional" / "checkpoint-60"
        checkpoint.mkdir(parents=True)
        (checkpoint / "optimizer.pt").write_bytes(b"\0" * 64)
    summary = analysis_summary()
    results = {
        "model_name": "Tiny GPT-NeoX", "slug": SLUG, "hf_id": HF_ID, "arch_family": "transformer",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "s_ratio": summary["ratios"]["count"]["S"], "k_ratio": summary["ratios"]["count"]["K"],
        "gray_ratio": summary["ratios"]["count"]["Gray"], "analysis": summary, "runs": runs,
        "timestamp": "2026-01-02T03:04:05+00:00", "seed": seed, "preset": "tiny", "device": device,
        "versions": versions(),
        "dataset": {"source": "hub", "name": "wikitext", "config_name": "wikitext-2-raw-v1"},
        "hyperparameters": {experiment: _hyperparameters(experiment) for experiment in EXPERIMENTS},
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return root

"""Memory and recompute cost of one training step, per memory-saving mode, on Pythia-70M and Mamba-130M shapes.

Random-init models from the built-in configs, synthetic tokens, AdamW. Modes: conventional; HF
activation checkpointing; HF checkpointing with offload; torch selective checkpointing that saves
matmul/attention outputs; bwsk reversible; bwsk reversible with a memory budget. Per mode:

* bytes kept for backward after one forward (`hf_bwsk.memory`, deterministic, any device);
* matmul/attention FLOPs of one forward + backward, recompute included (`torch.utils.flop_counter`);
* median wall time of full steps (forward, backward, AdamW) on the CPU;
* on CUDA: peak allocated memory and median step time under AMP fp16;
* each as a ratio to conventional from the same run, and the loss' difference to conventional.

Prints one JSON object and appends a table to docs/BENCHMARKS.md (device, versions, commit, date).

    python benchmarks/memory.py [--models pythia-70m mamba-130m] [--batch-size B] [--seq-len T]
                                [--steps 3] [--threads N] [--budget 300MB] [--no-append]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
from provenance import ROOT, append_to_section, provenance

BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Memory per training mode (`benchmarks/memory.py`)"
SHAPES = {"pythia-70m": (8, 512), "mamba-130m": (2, 256)}
MODES = (
    "conventional",
    "hf_checkpointing",
    "hf_checkpointing_offload",
    "torch_selective_save_matmuls",
    "bwsk_reversible",
    "bwsk_reversible_budget",
)
SEED = 0
_MB = 2**20
_MATMUL_OPS = [
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
]


def build(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    from hf_bwsk.models import load_config

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(load_config(name)).to(device)
    model.train()
    return model


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def apply_mode(mode: str, model, batch: dict, budget: int | None):
    """Switch `model` to `mode`; returns the ReversibleMode for the bwsk modes (else None)."""
    from hf_bwsk.analysis import find_decoder_layers
    from hf_bwsk.memory import ReversibleMode
    from hf_bwsk.memory.checkpointing import enable_checkpointing

    if mode == "hf_checkpointing":
        enable_checkpointing(model, {"use_reentrant": False})
    elif mode == "hf_checkpointing_offload":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    elif mode == "torch_selective_save_matmuls":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context_fn = functools.partial(create_selective_checkpoint_contexts, _MATMUL_OPS)
        enable_checkpointing(model, {"use_reentrant": False, "context_fn": context_fn})
    elif mode.startswith("bwsk_reversible"):
        reversible = ReversibleMode(
            model, find_layers=find_decoder_layers,
            memory_budget_bytes=budget if mode == "bwsk_reversible_budget" else None,
        )
        reversible.install_forward()
        reversible.setup(batch)
        return reversible
    return None


def step_times(model, batch: dict, steps: int, amp: bool) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    times = []
    for _ in range(steps):
        _synchronize(batch)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(batch)
        times.append(time.perf_counter() - start)
    return times


def _synchronize(batch: dict) -> None:
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()


def measure(name: str, mode: str, batch_size: int, seq_len: int, steps: int, budget: int | None) -> dict:
    """One mode on one model, on a fresh model from the same seed."""
    from hf_bwsk.memory.measure import bytes_kept_for_backward, count_train_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "hf_checkpointing_offload" and device.type == "cpu":
        return {"mode": mode, "skipped": "offload moves activations to host memory: nothing to move on a CPU run "
                "(and HF's pinned buffers need an accelerator)"}
    model = build(name, device)
    batch = synthetic_batch(model.config.vocab_size, batch_size, seq_len, device)
    reversible = apply_mode(mode, model, batch, budget)
    losses = []
    kept = bytes_kept_for_backward(lambda: losses.append(model(**batch).loss) or losses[-1])
    result = {
        "mode": mode,
        "loss": losses.pop().item(),
        "activation_bytes": kept.activation_bytes,
        "grad_buffer_bytes": kept.grad_buffer_bytes,
    }
    result["train_flops"] = count_train_flops(lambda: model(**batch).loss.backward())
    model.zero_grad(set_to_none=True)
    if device.type == "cpu":
        result["cpu_step_s"] = statistics.median(step_times(model, batch, steps, amp=False))
    else:
        torch.cuda.reset_peak_memory_stats(device)
        result["gpu_step_s"] = statistics.median(step_times(model, batch, steps, amp=True))
        result["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if reversible is not None:
        result["reversible"] = reversible.status()
        reversible.teardown()
    return result


def with_ratios(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        if "skipped" in row:
            continue
        row["loss_abs_diff"] = abs(row["loss"] - base["loss"])
        for key in ("activation_bytes", "train_flops", "cpu_step_s", "gpu_step_s", "gpu_peak_allocated_bytes"):
            if key in row and base.get(key):
                row[f"{key}_ratio"] = row[key] / base[key]
    return rows


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def append_table(results: dict) -> None:
    """Add this run's table under the benchmark's section of docs/BENCHMARKS.md (earlier runs stay)."""
    versions = results["versions"]
    lines = [
        f"### {results['date']}, commit {results['commit']}",
        "",
        f"Device: {results['device']}; torch {versions['torch']}, transformers {versions['transformers']}; "
        f"{results['threads']} CPU thread(s); {results['steps']} timed steps per mode (median); seed {SEED}. "
        + ("GPU: not measured (no CUDA device)." if not results["cuda"] else "GPU: AMP fp16."),
        "",
        "| model | batch x seq | mode | kept MB | kept x | FLOPs x | CPU step s | step x | GPU peak MB | GPU step x "
        "| loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in results["models"]:
        for row in model["modes"]:
            shape = f"{model['batch_size']} x {model['seq_len']}"
            if "skipped" in row:
                lines.append(f"| {model['model']} | {shape} | {row['mode']} | skipped: {row['skipped']} |||||||| ")
                continue
            peak = f"{row['gpu_peak_allocated_bytes'] / _MB:.0f}" if "gpu_peak_allocated_bytes" in row else "-"
            lines.append(
                f"| {model['model']} | {shape} | {row['mode']} | {row['activation_bytes'] / _MB:.1f} "
                f"| {row['activation_bytes_ratio']:.3f} | {row['train_flops_ratio']:.3f} "
                f"| {_cell(row, 'cpu_step_s', '.2f')} | {_cell(row, 'cpu_step_s_ratio', '.2f')} | {peak} "
                f"| {_cell(row, 'gpu_step_s_ratio', '.2f')} | {row['loss_abs_diff']:.1e} |"
            )
    intro = (
        "kept MB: activation bytes kept for backward after one forward (the fused loss's precomputed "
        "head-weight gradient, the `.grad` backward allocates anyway, is not counted). FLOPs: matmul/attention "
        "FLOPs of one forward + backward, recompute included. CPU wall time swings by ~30% run to run on shared "
        "machines: judge recompute by FLOPs."
    )
    append_to_section(SECTION, intro, lines)


def main() -> None:
    from hf_bwsk.memory.byte_size import parse_byte_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, help="override every model's batch size")
    parser.add_argument("--seq-len", type=int, help="override every model's sequence length")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per mode (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--budget", help="bwsk_reversible_budget's whole-step peak budget, e.g. 1300MB (default: "
                        "halfway between the predicted peaks of full recomputation and of the default plan)")
    parser.add_argument("--no-append", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = []
    for name in args.models:
        batch_size = args.batch_size or SHAPES[name][0]
        seq_len = args.seq_len or SHAPES[name][1]
        budget = parse_byte_size(args.budget) if args.budget else None
        rows = []
        for mode in MODES:
            if mode == "bwsk_reversible_budget" and budget is None:
                status = rows[-1]["reversible"]
                budget = (status["minimum_peak_bytes"] + status["predicted_peak_bytes"]) // 2
            rows.append(measure(name, mode, batch_size, seq_len, args.steps, budget))
            print(json.dumps(rows[-1]), flush=True)
        models.append({"model": name, "batch_size": batch_size, "seq_len": seq_len, "modes": with_ratios(rows)})
    results = {
        "benchmark": "memory",
        **provenance(),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "seed": SEED,
        "models": models,
    }
    print(json.dumps(results, indent=2))
    if not args.no_append:
        append_table(results)


if __name__ == "__main__":
    main()

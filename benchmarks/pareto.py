"""The memory/compute trade-off of every checkpointing scheme: kept bytes, whole-step peak and FLOPs per plan.

Random-init models, synthetic tokens, AdamW (its moments created before the measured step, as on
any step after the first). One measured training step per mode (forward, backward, optimizer step)
gives, all deterministic:

* the whole-step peak (`hf_bwsk.memory.step_peak`: live storages after every op, weights, grads and
  optimizer state included), split into training state and activations/transients;
* bytes kept for backward after the forward (`FirstStepMemory`);
* matmul/attention FLOPs of forward + backward, recompute included (`torch.utils.flop_counter`, in a
  separate pass: its module hooks would keep checkpointed tensors alive through the measured step);
* CPU wall time of that step: noisy (trackers running, cores shared), never a result on its own.

Modes: conventional; HF activation checkpointing of every layer and of every 2nd layer; HF
checkpointing + our fused loss (what TRL and Liger do by default); torch selective checkpointing
saving matmul/attention outputs; bwsk reversible (default plan); bwsk with whole-step peak budgets
spread between its least peak and its default plan's; bwsk with activation budgets (bytes the layers
keep) spread from the layer inputs through the default plan's to every matmul output's, the plans a
peak budget cannot choose where the training state sets the peak.

    python benchmarks/pareto.py run --shape pythia-70m --out /tmp/pythia.json [--modes ...]
    python benchmarks/pareto.py report /tmp/pythia.json /tmp/mamba.json ... [--png docs/pareto.png]

`run` prints one JSON line per mode and writes the shape's JSON; `report` appends the tables to
docs/BENCHMARKS.md (device, versions, commit, date) and draws the curves.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from memory import _MATMUL_OPS, synthetic_batch
from hf_bwsk.memory.checkpointing import enable_checkpointing
from provenance import ROOT, provenance

BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Pareto: kept bytes, whole-step peak and FLOPs per checkpointing scheme (`benchmarks/pareto.py`)"
SEED = 0
_MB = 2**20
# Llama-3.2-1B's widths with one decoder layer: layers' bytes and FLOPs scale linearly with the layer
# count (x16 for the real model); the embeddings, head and loss do not.
LLAMA_1B_CLASS = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
    num_hidden_layers=1, max_position_embeddings=2048, tie_word_embeddings=True,
)
SHAPES = {"pythia-70m": (8, 512), "mamba-130m": (2, 32), "llama-1b-class-1-layer": (1, 2048)}
BASELINES = ("conventional", "hf_checkpointing", "hf_checkpointing_every_2", "hf_checkpointing_fused_loss",
             "torch_selective_save_matmuls")
# bwsk budgets between the least peak (0) and the default plan's (1); 3 lets the plan keep every matmul output.
BUDGET_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 3.0)
# bwsk activation budgets: from the layer inputs (0) to the default plan's kept bytes (1), and on from there
# towards keeping every matmul output (2).
ACTIVATION_FRACTIONS = (0.0, 0.5, 0.75, 0.95, 1.15, 1.4, 1.65)
# `torch.compile` rows: "torch_compile_budget_<activation_memory_budget>" (see compile_budget.py).
COMPILE_PREFIX = "torch_compile_budget_"
COMPILE_BUDGETS = (0.1, 0.3, 0.5, 1.0)


def build(shape: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_bwsk.models import load_config

    config = LlamaConfig(**LLAMA_1B_CLASS) if shape.startswith("llama") else load_config(shape)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def fused_loss_forward(model):
    """Give `model` the fused linear cross-entropy on its last hidden state (no logits), as TRL/Liger do."""
    from hf_bwsk.memory import fused_linear_cross_entropy

    class_forward = type(model).forward

    @functools.wraps(class_forward)
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        head = self.get_output_embeddings()
        return {"loss": fused_linear_cross_entropy(hidden, head.weight, labels, bias=getattr(head, "bias", None))}

    model.forward = forward.__get__(model)


def apply_mode(mode: str, model, batch: dict, optimizer, budget: int | None, activations: int | None = None):
    """Switch `model` to `mode`; the bwsk modes return `ReversibleMode.status()`."""
    from hf_bwsk.analysis import find_decoder_layers
    from hf_bwsk.memory import ReversibleMode

    no_reentrant = {"use_reentrant": False}
    if mode == "hf_checkpointing":
        enable_checkpointing(model, no_reentrant)
    elif mode == "hf_checkpointing_every_2":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant, every_n_layers=2)
    elif mode == "hf_checkpointing_fused_loss":
        enable_checkpointing(model, no_reentrant)
        fused_loss_forward(model)
    elif mode == "torch_selective_save_matmuls":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context_fn = functools.partial(create_selective_checkpoint_contexts, _MATMUL_OPS)
        enable_checkpointing(model, {**no_reentrant, "context_fn": context_fn})
    elif mode.startswith("bwsk"):
        reversible = ReversibleMode(model, find_layers=find_decoder_layers, memory_budget_bytes=budget,
                                    activation_budget_bytes=activations)
        reversible.install_forward()
        return reversible.setup(batch, optimizer=optimizer)
    return None


def create_adam_state(model, optimizer) -> None:
    """AdamW's moments exist on every step after the first: create them without a forward (lr 0, zero grads)."""
    lr = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, value in zip(optimizer.param_groups, lr):
        group["lr"] = value


def measure(shape: str, mode: str, budget: int | None = None, activations: int | None = None) -> dict:
    """One mode on a fresh model from the same seed: one tracked training step."""
    from hf_bwsk.memory import FirstStepMemory, count_train_flops, step_peak

    if mode.startswith(COMPILE_PREFIX):
        return measure_compiled(shape, float(mode.removeprefix(COMPILE_PREFIX)))
    model = build(shape)
    batch_size, seq_len = SHAPES[shape]
    batch = synthetic_batch(model.config.vocab_size, batch_size, seq_len, torch.device("cpu"))
    # What `Trainer` builds by default (`optim="adamw_torch_fused"`): its step allocates no temporaries.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    create_adam_state(model, optimizer)
    status = apply_mode(mode, model, batch, optimizer, budget, activations)
    kept = FirstStepMemory(model)
    losses = []

    def step():
        loss = model(**batch)["loss"]
        loss.backward()
        # Drop the loss before the optimizer step, as Trainer does (it returns `loss.detach()`): its graph
        # would keep checkpointing's bookkeeping alive through the step.
        losses.append(loss.item())
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    peak = step_peak(step, model=model, optimizer=optimizer)
    seconds = time.perf_counter() - start
    kept.remove()
    # FLOPs in a pass of their own: the counter's module tracker hooks keep checkpointed layers' tensors
    # alive through the optimizer step, which would inflate the peak.
    train_flops = count_train_flops(lambda: model(**batch)["loss"].backward())
    model.zero_grad(set_to_none=True)
    # Kept bytes as activations only: the fused loss' head-weight gradient is the `.grad` every mode allocates.
    row = {"mode": mode, "loss": losses[0], "peak": peak.to_dict(), "kept_bytes": kept.measurement.activation_bytes,
           "grad_buffer_bytes_kept": kept.measurement.grad_buffer_bytes, "train_flops": train_flops,
           "cpu_step_s_noisy": seconds}
    if budget is not None:
        row["budget_bytes"] = budget
    if activations is not None:
        row["activation_budget_bytes"] = activations
    if status is not None:
        row["reversible"] = {key: status.get(key) for key in (
            "status", "loss_chunk_size", "predicted_peak_bytes", "minimum_peak_bytes", "training_state_bytes")}
        row["reversible"]["plan"] = {key: status["plan"][key] for key in (
            "kept_bytes_estimate", "minimum_bytes", "keep_all_matmuls_bytes", "recompute_flops_fraction")
        } if "plan" in status else None
    return row


def measure_compiled(shape: str, budget: float) -> dict:
    """`torch.compile` under ``activation_memory_budget``: kept bytes and FLOPs of its partition (no peak)."""
    from compile_budget import budget_context, compile_with_budget

    model = build(shape)
    batch_size, seq_len = SHAPES[shape]
    batch = synthetic_batch(model.config.vocab_size, batch_size, seq_len, torch.device("cpu"))
    compiled, counts = compile_with_budget(model, budget)
    start = time.perf_counter()
    with budget_context(budget):
        loss = compiled(**batch)["loss"]
        loss.backward()
    seconds = time.perf_counter() - start
    return {"mode": f"{COMPILE_PREFIX}{budget}", "loss": loss.item(), "peak": None, "kept_bytes": counts.kept_bytes,
            "grad_buffer_bytes_kept": 0, "train_flops": counts.flops, "cpu_step_s_noisy": seconds,
            "compiled_graphs": counts.graphs, "activation_memory_budget": budget}


def run(shape: str, modes: list[str], out: str, fractions: tuple[float, ...] = BUDGET_FRACTIONS) -> None:
    rows = []
    for mode in modes:
        if mode == "bwsk_budgets":
            default = next(row for row in rows if row["mode"] == "bwsk_reversible")["reversible"]
            low, high = default["minimum_peak_bytes"], default["predicted_peak_bytes"]
            # When the state, not the activations, sets the peak (Mamba at 2 x 32) the budgets coincide: one row each.
            for budget in dict.fromkeys(int(low + fraction * (high - low)) for fraction in fractions):
                rows.append(measure(shape, f"bwsk_budget_{budget / _MB:.0f}MiB", budget))
                print(json.dumps(rows[-1]), flush=True)
            continue
        if mode == "bwsk_activation_budgets":
            plan = next(row for row in rows if row["mode"] == "bwsk_reversible")["reversible"]["plan"]
            points = (plan["minimum_bytes"], plan["kept_bytes_estimate"], plan["keep_all_matmuls_bytes"])
            for activations in dict.fromkeys(_along(points, fraction) for fraction in ACTIVATION_FRACTIONS):
                rows.append(measure(shape, f"bwsk_activations_{activations / _MB:.1f}MiB", activations=activations))
                print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append(measure(shape, mode))
        print(json.dumps(rows[-1]), flush=True)
    batch_size, seq_len = SHAPES[shape]
    result = {"shape": shape, "batch_size": batch_size, "seq_len": seq_len, "threads": torch.get_num_threads(),
              **provenance(), "rows": rows}
    with open(out, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)


def _along(points: tuple[int, ...], fraction: float) -> int:
    """The point ``fraction`` of the way along the polyline ``points`` (1 per segment)."""
    segment = min(int(fraction), len(points) - 2)
    start, end = points[segment], points[segment + 1]
    return int(start + (fraction - segment) * (end - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="measure one shape's modes into a JSON file")
    run_parser.add_argument("--shape", choices=list(SHAPES), required=True)
    run_parser.add_argument("--modes", nargs="+", default=[
        *BASELINES, *(f"{COMPILE_PREFIX}{budget}" for budget in COMPILE_BUDGETS), "bwsk_reversible", "bwsk_budgets",
        "bwsk_activation_budgets"],
                            help="modes in order; bwsk_budgets and bwsk_activation_budgets need bwsk_reversible before them")
    run_parser.add_argument("--out", required=True)
    run_parser.add_argument("--budget-fractions", nargs="+", type=float, default=list(BUDGET_FRACTIONS),
                            help="bwsk budgets: least peak + fraction x (default plan's peak - least peak)")
    run_parser.add_argument("--threads", type=int)
    report_parser = commands.add_parser("report", help="append the tables and draw the curves")
    report_parser.add_argument("results", nargs="+")
    report_parser.add_argument("--png", default=str(ROOT / "docs" / "pareto.png"))
    args = parser.parse_args()
    if args.command == "run":
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args.shape, args.modes, args.out, tuple(args.budget_fractions))
    else:
        from pareto_report import report

        report(args.results, args.png, BENCHMARKS, SECTION)


if __name__ == "__main__":
    main()

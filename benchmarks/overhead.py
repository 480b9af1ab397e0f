"""Run-time overhead of the reversible mode's machinery on a tiny model, where it is not hidden by FLOPs.

A tiny GPT-NeoX (random init, fp32, CPU, 1 thread by default) trains with AdamW in four modes, the
modes interleaved step by step so machine noise hits them alike; each mode's step time is the
median of many steps:

* `conventional`: nothing saved or recomputed beyond autograd's default;
* `hf_checkpointing`: HF activation checkpointing of every layer (non-reentrant);
* `hf_checkpointing_fused_loss`: the same with our fused loss (`ReversibleMode(layer_policy=False)`),
  the TRL/Liger default of full checkpointing and a chunked head;
* `torch_sac_keep_matmuls`: torch selective checkpointing with a constant policy (keep matmul and
  attention outputs): the cost of torch's per-op dispatch mode alone;
* `bwsk_reversible`: `ReversibleMode` (the plan + the fused loss), as it runs by default: scoped
  execution (plain checkpointing, keep/replay only inside the modules holding kept ops);
* `bwsk_reversible_per_op`: the same plan run per op, through torch's selective-checkpoint mode.

Also the cost of one policy call (ours against the constant policy) in microseconds. Ratios are to
`hf_checkpointing` from the same run (the target: reversible <= 1.05x). Prints JSON and appends a
table to docs/BENCHMARKS.md.

    python benchmarks/overhead.py [--layers 4] [--hidden 64] [--batch-size 4] [--seq-len 64]
                                  [--steps 200] [--threads 1] [--no-append]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import timeit

import torch
from hf_bwsk.memory.checkpointing import enable_checkpointing
from provenance import ROOT, append_to_section, provenance

BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Overhead of the reversible mode on a tiny model (`benchmarks/overhead.py`)"
MODES = ("conventional", "hf_checkpointing", "hf_checkpointing_fused_loss", "torch_sac_keep_matmuls", "bwsk_reversible",
         "bwsk_reversible_per_op")
_KEEP_MATMULS = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]


def build(args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=4, intermediate_size=4 * args.hidden, rotary_pct=0.25,
                           max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    return model


def prepare(mode: str, model, batch):
    """Switch ``mode`` on; returns the ReversibleMode for the `bwsk_reversible*` modes (None otherwise)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if mode == "hf_checkpointing":
        enable_checkpointing(model, {"use_reentrant": False})
    elif mode == "torch_sac_keep_matmuls":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _KEEP_MATMULS)
        enable_checkpointing(model, {"use_reentrant": False, "context_fn": context_fn})
    elif mode == "hf_checkpointing_fused_loss":
        from hf_bwsk.memory import ReversibleMode

        fused_loss = ReversibleMode(model, layer_policy=False)
        fused_loss.install_forward()
        fused_loss.setup(batch)
        enable_checkpointing(model, {"use_reentrant": False})
    elif mode.startswith("bwsk_reversible"):
        from hf_bwsk.analysis import find_decoder_layers
        from hf_bwsk.memory import ReversibleMode

        execution = "per_op" if mode.endswith("per_op") else "auto"
        reversible = ReversibleMode(model, find_layers=find_decoder_layers, execution=execution)
        reversible.install_forward()
        reversible.setup(batch)
        return reversible
    return None


def step_seconds(model, optimizer, batch) -> tuple[float, float]:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def policy_call_microseconds(reversible) -> dict:
    """One call of the plan's per-op policy and of a constant policy, on an op the plan keeps (a matmul)."""
    from torch.utils.checkpoint import CheckpointPolicy

    class Forward:
        is_recompute = False

    key = min(key for key in reversible.plan.keep if key.op.startswith("aten.addmm"))
    op = torch.ops.aten.addmm.default
    # As the tracker's hooks set them inside that module of that layer.
    reversible.policy.tracker.layer = key.layer
    reversible.policy.tracker._stack.append(key.path)
    constant = lambda ctx, func, *args, **kwargs: (  # noqa: E731
        CheckpointPolicy.MUST_SAVE if func in _KEEP_MATMULS else CheckpointPolicy.PREFER_RECOMPUTE)
    calls = 20_000

    def ours():  # a fresh layer call each time, so every call is the op's first occurrence: a plan hit
        reversible.policy.layer_policy()(Forward, op)

    def baseline():
        constant(Forward, op)

    hits_before = reversible.policy.fidelity["plan_hits"]
    ours_s = min(timeit.repeat(ours, number=calls, repeat=5)) / calls
    baseline_s = min(timeit.repeat(baseline, number=calls, repeat=5)) / calls
    assert reversible.policy.fidelity["plan_hits"] - hits_before == 5 * calls, "the timed calls must be plan hits"
    make_policy_s = min(timeit.repeat(reversible.policy.layer_policy, number=calls, repeat=5)) / calls
    return {"bwsk_policy_us": (ours_s - make_policy_s) * 1e6, "constant_policy_us": baseline_s * 1e6}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    models = {mode: build(args) for mode in MODES}
    reversible = {mode: prepare(mode, models[mode], batch) for mode in MODES}
    scoped, per_op = reversible["bwsk_reversible"], reversible["bwsk_reversible_per_op"]
    optimizers = {mode: torch.optim.AdamW(models[mode].parameters(), lr=1e-3) for mode in MODES}
    times = {mode: [] for mode in MODES}
    losses = {mode: [] for mode in MODES}
    for step in range(args.warmup + args.steps):
        for mode in MODES:  # interleaved: noise hits every mode alike
            seconds, loss = step_seconds(models[mode], optimizers[mode], batch)
            losses[mode].append(loss)
            if step >= args.warmup:
                times[mode].append(seconds)
    for mode in MODES:
        if not all(torch.isfinite(torch.tensor(losses[mode]))):
            raise SystemExit(f"{mode}: non-finite loss, no result reported")
    median_ms = {mode: statistics.median(times[mode]) * 1e3 for mode in MODES}
    fidelity = {key: value for key, value in scoped.policy.fidelity.items() if key != "first_misses"}
    return {
        "shape": {"layers": args.layers, "hidden": args.hidden, "batch_size": args.batch_size,
                  "seq_len": args.seq_len, "vocab": args.vocab},
        "threads": args.threads,
        "steps": args.steps,
        "median_step_ms": median_ms,
        "quartiles_ms": {mode: [q * 1e3 for q in statistics.quantiles(times[mode], n=4)] for mode in MODES},
        "ratio_to_hf_checkpointing": {mode: median_ms[mode] / median_ms["hf_checkpointing"] for mode in MODES},
        "execution": scoped.status()["execution"],
        "max_loss_diff_to_conventional": max(abs(a - b) for mode in MODES if mode not in ("conventional", "hf_checkpointing")
                                             for a, b in zip(losses[mode], losses["conventional"])),
        "policy_call": policy_call_microseconds(per_op),
        "plan_fidelity": fidelity,
        **provenance(),
    }


def append(result: dict) -> None:
    shape = result["shape"]
    lines = [
        f"\n### {result['date']}, commit {result['commit']}\n",
        f"Device: {result['device']}; torch {result['versions'].get('torch')}, transformers "
        f"{result['versions'].get('transformers')}; {result['threads']} CPU thread(s); GPT-NeoX {shape['layers']} "
        f"layers, hidden {shape['hidden']}, vocab {shape['vocab']}, batch {shape['batch_size']} x {shape['seq_len']}, "
        f"AdamW; median of {result['steps']} interleaved steps; bwsk_reversible ran {result['execution']}. Per-op policy call: ours "
        f"{result['policy_call']['bwsk_policy_us']:.2f} us, constant policy {result['policy_call']['constant_policy_us']:.2f} us.\n",
        "| mode | median step ms | quartiles ms | x HF checkpointing |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        low, _, high = result["quartiles_ms"][mode]
        lines.append(f"| {mode} | {result['median_step_ms'][mode]:.2f} | {low:.2f}-{high:.2f} | "
                     f"{result['ratio_to_hf_checkpointing'][mode]:.3f} |")
    append_to_section(SECTION, "", lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if not args.no_append:
        append(result)


if __name__ == "__main__":
    main()

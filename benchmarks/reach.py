"""Bytes kept and FLOPs of the reversible mode where people fine-tune: TRL's SFTTrainer and PEFT LoRA.

A tiny random-init Llama (default hidden 256, 4 layers, vocab 8192) on synthetic tokens, CPU, fp32.

* TRL (`trl.SFTTrainer`, its loss path: the chunked fused LM head that also yields entropy and
  accuracy): SFT without checkpointing, SFT's defaults (HF activation checkpointing of every layer),
  and SFT with our layer policy (`BWSKMixin`; TRL's loss kept, so only the policy applies).
* PEFT LoRA (r 8 on q/k/v/o/up/down/gate): conventional, HF activation checkpointing, and reversible
  (layer policy + fused loss), the loss being HF's causal-LM loss.

Per mode: activation bytes kept for backward after one forward (`bytes_kept_for_backward`) and
matmul/attention FLOPs of one forward + backward (`count_train_flops`), with ratios to the first
mode of each group from the same run. Prints one JSON object and appends a table to
docs/BENCHMARKS.md (device, versions, commit, date).

    python benchmarks/reach.py [--batch-size 4] [--seq-len 256] [--threads 1] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass

import torch
from provenance import ROOT, append_to_section, provenance

BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## The mode with TRL and PEFT (`benchmarks/reach.py`)"
SEED = 0
VOCAB = 8192
_MB = 2**20


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=688, max_position_embeddings=1024)
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def token_rows(batch_size: int, seq_len: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(1, VOCAB, (batch_size, seq_len), generator=generator).tolist()


def cost(loss_fn) -> dict:
    """Bytes kept for backward by one forward, and FLOPs of forward + backward."""
    from hf_bwsk.memory import bytes_kept_for_backward, count_train_flops

    kept = bytes_kept_for_backward(loss_fn)
    flops = count_train_flops(lambda: loss_fn().backward())
    return {"activation_bytes": kept.activation_bytes, "train_flops": flops, "loss": float(loss_fn().detach())}


def sft_rows(batch_size: int, seq_len: int) -> list[dict]:
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from hf_bwsk import BWSKMixin, BWSKTrainingArguments
    from hf_bwsk.memory.checkpointing import enable_checkpointing

    @dataclass
    class Config(SFTConfig, BWSKTrainingArguments):
        pass

    class Trainer(BWSKMixin, SFTTrainer):
        pass

    # A word-level tokenizer over the ids: SFTTrainer needs one, the rows are already token ids.
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t0")
    dataset = Dataset.from_list([{"input_ids": row} for row in token_rows(batch_size, seq_len)])
    rows = []
    for mode in ("sft_no_checkpointing", "sft_defaults_checkpointing", "sft_bwsk_layer_policy"):
        args = Config(output_dir=tempfile.mkdtemp(), bwsk_mode="reversible" if "bwsk" in mode else "conventional",
                      per_device_train_batch_size=batch_size, max_length=seq_len, report_to=[], use_cpu=True,
                      gradient_checkpointing=mode == "sft_defaults_checkpointing", seed=SEED, disable_tqdm=True)
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=dataset, processing_class=tokenizer)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model = trainer.model
        if mode == "sft_defaults_checkpointing":  # as Trainer.train() does it with SFT's defaults
            enable_checkpointing(model, dict(args.gradient_checkpointing_kwargs or {"use_reentrant": False}))
        if trainer.reversible_mode is not None:
            trainer.reversible_mode.install_forward()
            trainer.compute_loss(model, dict(inputs))  # the first training forward plans
        rows.append({"group": "trl_sft", "mode": mode, **cost(lambda: trainer.compute_loss(model, dict(inputs)))})
        if trainer.reversible_mode is not None:
            rows[-1]["plan"] = trainer.reversible_mode.status()["plan"]
            trainer.reversible_mode.remove()
    return rows


def lora_rows(batch_size: int, seq_len: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    from hf_bwsk import apply_reversible
    from hf_bwsk.memory.checkpointing import enable_checkpointing

    input_ids = torch.tensor(token_rows(batch_size, seq_len))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    rows = []
    for mode in ("lora_conventional", "lora_hf_checkpointing", "lora_bwsk_reversible"):
        model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                        lora_dropout=0.0, task_type="CAUSAL_LM"))
        handle = None
        if mode == "lora_hf_checkpointing":
            enable_checkpointing(model.get_base_model(), {"use_reentrant": False})
        elif mode == "lora_bwsk_reversible":
            handle = apply_reversible(model)
            model(**batch)  # the first training forward plans
        rows.append({"group": "peft_lora", "mode": mode, **cost(lambda: model(**batch).loss)})
        if handle is not None:
            rows[-1]["plan"] = handle.status()["plan"]
            handle.remove()
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        row["activation_bytes_ratio"] = row["activation_bytes"] / base["activation_bytes"]
        row["train_flops_ratio"] = row["train_flops"] / base["train_flops"]
        row["loss_abs_diff"] = abs(row["loss"] - base["loss"])
    return rows


def append_table(results: dict) -> None:
    """Add this run's table under the benchmark's section of docs/BENCHMARKS.md (earlier runs stay)."""
    versions = results["versions"]
    lines = [
        f"### {results['date']}, commit {results['commit']}",
        "",
        f"Device: {results['device']}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"trl {versions.get('trl', results['trl'])}, peft {results['peft']}; {results['threads']} CPU thread(s); "
        f"tiny Llama (hidden 256, 4 layers, vocab {VOCAB}), fp32, batch {results['batch_size']} x "
        f"{results['seq_len']}; ratios to the first row of each group.",
        "",
        "| group | mode | kept MB | kept x | FLOPs x | loss diff |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['group']} | {row['mode']} | {row['activation_bytes'] / _MB:.2f} "
                     f"| {row['activation_bytes_ratio']:.3f} | {row['train_flops_ratio']:.3f} "
                     f"| {row['loss_abs_diff']:.1e} |")
    intro = (
        "kept MB: activation bytes kept for backward after one forward (the fused loss's precomputed head-weight "
        "gradient is not counted). FLOPs: matmul/attention FLOPs of one forward + backward, recompute included. "
        "TRL rows use TRL's own loss path (its chunked fused head)."
    )
    append_to_section(SECTION, intro, lines)


def main() -> None:
    import peft
    import trl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-append", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = with_ratios(sft_rows(args.batch_size, args.seq_len)) + with_ratios(lora_rows(args.batch_size, args.seq_len))
    results = {"benchmark": "reach", **provenance(), "threads": torch.get_num_threads(), "seed": SEED,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "trl": trl.__version__,
               "peft": peft.__version__, "rows": rows}
    print(json.dumps(results, indent=2))
    if not args.no_append:
        append_table(results)


if __name__ == "__main__":
    main()

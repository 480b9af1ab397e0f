"""Tiny random-init causal LMs of every supported architecture, shared by the tests."""

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MambaConfig,
    OPTConfig,
)

VOCAB = 128

# Sizes are small but keep every structural feature of the real family (parallel residual and
# partial rotary for NeoX, gated MLP and GQA for Llama, the selective scan for Mamba, ...).
TINY_CONFIGS = {
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "mamba": lambda: MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
        conv_kernel=4, time_step_rank=4,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=32,
    ),
}
ARCHS = sorted(TINY_CONFIGS)


def tiny_config(arch: str):
    return TINY_CONFIGS[arch]()


def tiny_model(arch: str, seed: int = 0, **config_overrides):
    """A freshly initialised tiny model in fp32 on CPU, identical for the same seed."""
    config = tiny_config(arch)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def tiny_batch(batch_size: int = 2, seq_len: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

"""Experiment presets: the published configurations ("full") and their offline miniatures ("tiny").

A preset says what to train and on what (base model, data, sizes, learning rates); the runner in
:mod:`hf_bwsk.experiments.runner` does the rest the same way for every preset. A recipe for another model
is a dict of presets like :data:`PYTHIA_PRESETS` plus one call to :func:`hf_bwsk.recipe.main`.
"""

from collections.abc import Callable
from dataclasses import dataclass

from transformers import GPTNeoXConfig, MambaConfig, PretrainedConfig

from ..errors import BWSKError
from .data import HubText, TinyCorpus

WIKITEXT_2 = HubText("wikitext", "wikitext-2-raw-v1")


@dataclass(frozen=True)
class TinyBase:
    """A fine-tune base made offline: a BPE tokenizer trained on the corpus's ``base`` slice and a
    small random-init model pretrained on that slice (disjoint from train/validation/test)."""

    make_config: Callable[[int, int], PretrainedConfig]  # (vocab_size, block_size) -> config
    vocab_size: int
    pretrain_epochs: int
    pretrain_learning_rate: float


@dataclass(frozen=True)
class Preset:
    """Everything that differs between two runs of the six-variant grid.

    ``base`` is a Hub id or local directory of the pretrained model that "finetune" starts from
    (and whose config, with random init, "scratch" starts from), or a :class:`TinyBase` to make
    one offline. ``max_epochs`` caps training; early stopping usually ends it sooner.
    """

    name: str
    model_name: str
    slug: str
    arch_family: str  # "transformer" | "ssm", as on the published cards
    base: str | TinyBase
    data: HubText | TinyCorpus
    block_size: int
    batch_size: int
    finetune_learning_rate: float
    scratch_learning_rate: float
    max_epochs: int
    warmup_ratio: float = 0.1
    logging_steps: int = 50
    # Intra-op CPU threads (None: torch's default). Tiny models gain nothing from more than one,
    # and on a busy CPU the extra threads' spin-waiting made a tiny Mamba step 80x slower here.
    torch_threads: int | None = None

    def training_defaults(self) -> dict:
        """``TrainingArguments`` values this preset sets unless the user gives them."""
        return {
            "per_device_train_batch_size": self.batch_size,
            "per_device_eval_batch_size": self.batch_size,
            "learning_rate": self.finetune_learning_rate,
            "warmup_steps": self.warmup_ratio,
            "logging_steps": self.logging_steps,
            "output_dir": f"bwsk-{self.slug}",
        }


def tiny_gpt_neox_config(vocab_size: int, block_size: int) -> GPTNeoXConfig:
    """Pythia's architecture (parallel residual, 25% rotary, untied head, no dropout) in miniature."""
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        max_position_embeddings=block_size, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def tiny_mamba_config(vocab_size: int, block_size: int) -> MambaConfig:
    """Mamba-130M's architecture (selective scan, tied embeddings) in miniature."""
    return MambaConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
        conv_kernel=4, time_step_rank=4, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


PYTHIA_PRESETS = {
    "full": Preset(
        name="full", model_name="Pythia-70M", slug="pythia-70m", arch_family="transformer",
        base="EleutherAI/pythia-70m", data=WIKITEXT_2, block_size=512, batch_size=8,
        finetune_learning_rate=5e-5, scratch_learning_rate=3e-4, max_epochs=10,
    ),
    "tiny": Preset(
        name="tiny", model_name="Pythia-tiny", slug="pythia-tiny", arch_family="transformer",
        base=TinyBase(tiny_gpt_neox_config, vocab_size=1024, pretrain_epochs=2, pretrain_learning_rate=2e-3),
        # 200 KB of the ~460 KB corpus keeps all six variants within minutes on a 2-core CPU.
        data=TinyCorpus(max_chars=200_000), block_size=64, batch_size=8,
        finetune_learning_rate=5e-4, scratch_learning_rate=2e-3, max_epochs=3, logging_steps=10, torch_threads=1,
    ),
}

MAMBA_PRESETS = {
    "full": Preset(
        name="full", model_name="Mamba-130M", slug="mamba-130m", arch_family="ssm",
        base="state-spaces/mamba-130m-hf", data=WIKITEXT_2, block_size=256, batch_size=2,
        finetune_learning_rate=3e-5, scratch_learning_rate=2e-4, max_epochs=10,
    ),
    "tiny": Preset(
        name="tiny", model_name="Mamba-tiny", slug="mamba-tiny", arch_family="ssm",
        base=TinyBase(tiny_mamba_config, vocab_size=1024, pretrain_epochs=2, pretrain_learning_rate=2e-3),
        # The reference selective scan (no CUDA kernels) loops over the sequence: shorter blocks, less text.
        data=TinyCorpus(max_chars=100_000), block_size=32, batch_size=8,
        finetune_learning_rate=5e-4, scratch_learning_rate=2e-3, max_epochs=3, logging_steps=10, torch_threads=1,
    ),
}

PRESETS = {"pythia": PYTHIA_PRESETS, "mamba": MAMBA_PRESETS}


def get_preset(presets: dict[str, Preset], name: str) -> Preset:
    """``presets[name]``, or a BWSKError that lists the valid names."""
    if name not in presets:
        raise BWSKError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(presets))}")
    return presets[name]

"""An offline byte-level BPE tokenizer, trained in seconds, for the tiny presets.

No Pythia/NeoX or Mamba tokenizer ships offline, so the tiny presets train their own on the text
the "fine-tune" base is pretrained on. Byte-level BPE (GPT-2's scheme) can encode any text, so the
tokenizer never meets an unknown character in the other slices.
"""

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (incl. ``<|endoftext|>``) on ``texts``.

    The result is deterministic for the same texts and saves/loads like any Hub tokenizer
    (``save_pretrained`` / ``AutoTokenizer.from_pretrained``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # One special token serves as bos/eos/pad, as in the GPT-NeoX and Mamba tokenizers.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=model_max_length,
    )

"""The tiny presets' offline "fine-tune" base: a BPE tokenizer and a short pretraining.

Both are made from the corpus's ``base`` slice, disjoint from the train/validation/test text, and
cached under ``output_dir/checkpoints/`` so a resumed run reuses them. From then on the base is a
local model directory like any Hub checkpoint, and the runner treats it as such.
"""

import dataclasses
import os
import shutil
from pathlib import Path

from .data import load_text_files, pack_blocks
from .presets import TinyBase
from .tokenization import train_bpe_tokenizer


def base_tokenizer(tiny: TinyBase, base_text: str, directory: Path, block_size: int):
    """The cached base's tokenizer, or a fresh one trained on ``base_text`` (deterministic)."""
    from transformers import AutoTokenizer

    if is_made(directory):
        return AutoTokenizer.from_pretrained(directory)
    return train_bpe_tokenizer(base_text.splitlines(keepends=True), tiny.vocab_size, model_max_length=block_size)


def is_made(directory: Path) -> bool:
    # The directory only ever appears complete (written under another name, then renamed).
    return (Path(directory) / "config.json").is_file()


def make_base(tiny: TinyBase, *, tokenizer, base_file: str, block_size: int, training_args, directory: Path) -> Path:
    """Pretrain a random-init model of ``tiny``'s architecture on ``base_file`` and save it with the tokenizer.

    Every process of a distributed launch takes part (the Trainer shards the data); only the main
    process writes. Runs with the user's training arguments except for what a pretraining without
    evaluation needs. Returns ``directory``; a directory already made is reused as is.
    """
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        default_data_collator,
        set_seed,
    )

    directory = Path(directory)
    if is_made(directory):
        return directory
    blocks = pack_blocks(load_text_files({"train": base_file}, block_size), tokenizer, block_size)["train"]
    args = dataclasses.replace(
        training_args,
        output_dir=str(directory.with_name(directory.name + "-pretraining")),
        num_train_epochs=tiny.pretrain_epochs,
        learning_rate=tiny.pretrain_learning_rate,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
    )
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(tiny.make_config(len(tokenizer), block_size))
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                      processing_class=tokenizer)
    trainer.train()
    partial = directory.with_name(f".{directory.name}.partial")
    trainer.save_model(str(partial))
    if args.process_index == 0:
        # Trainer pickles its arguments beside the weights; a base model folder needs only the model.
        (partial / "training_args.bin").unlink(missing_ok=True)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(partial, directory)
    trainer.accelerator.wait_for_everyone()
    return directory

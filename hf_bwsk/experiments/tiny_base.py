"""The tiny presets' offline "fine-tune" base: a BPE tokenizer and a short pretraining.

Both are made from the corpus's ``base`` slice, disjoint from the train/validation/test text, and
cached under ``output_dir/checkpoints/`` so a resumed run reuses them. From then on the base is a
local model directory like any Hub checkpoint, and the runner treats it as such.
"""

import dataclasses
import os
import shutil
from pathlib import Path

from ..layout import files_under
from .data import load_text_files, pack_blocks
from .presets import TinyBase
from .tokenization import train_bpe_tokenizer


def base_tokenizer(tiny: TinyBase, base_text: str, directory: Path | None, block_size: int):
    """The tokenizer of the base made in ``directory``, or (none made, or ``directory`` None: starting
    over) a fresh one trained on ``base_text`` (deterministic)."""
    from transformers import AutoTokenizer

    if directory is not None and is_made(directory):
        return AutoTokenizer.from_pretrained(directory)
    return train_bpe_tokenizer(base_text.splitlines(keepends=True), tiny.vocab_size, model_max_length=block_size)


def is_made(directory: Path) -> bool:
    # The directory only ever appears complete (written under another name, then renamed).
    return (Path(directory) / "config.json").is_file()


def make_base(tiny: TinyBase, *, tokenizer, base_file: str, block_size: int, training_args,
              directory: Path) -> tuple[Path, list[Path]]:
    """Pretrain a random-init model of ``tiny``'s architecture on ``base_file`` and save it with the tokenizer.

    Every process of a distributed launch takes part (the Trainer shards the data); only the main
    process writes. Runs with the user's training arguments except for what a pretraining without
    evaluation needs. Returns ``directory`` and the files written into it (none on other processes,
    or when a directory already made is reused as is).
    """
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        default_data_collator,
        set_seed,
    )

    directory = Path(directory)
    if is_made(directory):
        return directory, []
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
    written = []
    if args.process_index == 0:
        # Trainer pickles its arguments beside the weights; a base model folder needs only the model.
        (partial / "training_args.bin").unlink(missing_ok=True)
        written = _move_into(partial, directory)
    trainer.accelerator.wait_for_everyone()
    return directory, written


def _move_into(partial: Path, directory: Path) -> list[Path]:
    """Move the saved files into ``directory``, ``config.json`` last (``is_made`` looks for it); files
    of others already there stay. Returns the files moved."""
    files = sorted(files_under(partial), key=lambda path: path.name == "config.json")
    targets = [directory / path.relative_to(partial) for path in files]
    for source, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(partial)
    return targets

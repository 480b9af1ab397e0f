"""Text for the experiments: loading, tokenising, packing into blocks, and the offline tiny corpus.

Every source ends as a ``DatasetDict`` of raw ``text`` with train / validation / test splits, then
goes through the same tokenise-concatenate-pack step (run_clm's recipe, over each whole split):
the Hub's WikiText-2, local text files, or the stdlib's English prose written to local files.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BWSKError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class HubText:
    """A text dataset on the Hugging Face Hub with train / validation / test splits."""

    name: str
    config_name: str | None = None
    text_column: str = "text"

    def describe(self) -> dict:
        return {"source": "hub", "name": self.name, "config_name": self.config_name}


@dataclass(frozen=True)
class TinyCorpus:
    """The offline corpus: English prose from the stdlib's ``pydoc_data.topics`` (~460 KB).

    Paragraphs are dealt round-robin into disjoint slices, 10 at a time: 5 to ``base`` (the tiny
    "fine-tune" base is pretrained on it), 3 to train, 1 to validation, 1 to test, so every slice
    samples the whole corpus. ``max_chars`` keeps only the first characters (for quick tests).
    """

    max_chars: int | None = None

    def describe(self) -> dict:
        return {"source": "pydoc_data.topics", "name": "python-docs-topics", "max_chars": self.max_chars}


# Which slice paragraph number k goes to: TINY_DEAL[k % 10].
TINY_DEAL = ("base",) * 5 + ("train",) * 3 + ("validation", "test")


def tiny_corpus_slices(max_chars: int | None = None) -> dict[str, str]:
    """The stdlib corpus split into disjoint ``base`` / train / validation / test texts."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[name] for name in sorted(topics))[:max_chars]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    slices = {name: [] for name in dict.fromkeys(TINY_DEAL)}
    for number, paragraph in enumerate(paragraphs):
        slices[TINY_DEAL[number % len(TINY_DEAL)]].append(paragraph)
    return {name: "\n\n".join(parts) + "\n" for name, parts in slices.items()}


def write_tiny_corpus_texts(slices: dict[str, str], directory: str | Path) -> dict[str, Path]:
    """Write corpus slices (:func:`tiny_corpus_slices`) as ``<slice>.txt`` under ``directory``; return slice -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in slices.items():
        paths[name] = directory / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def text_splits(texts: dict[str, str]):
    """In-memory texts (split -> text) as a ``DatasetDict`` with a ``text`` column, one line per row,
    line breaks kept: what ``load_text_files`` gives for the same texts written to files."""
    import datasets

    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": text.splitlines(keepends=True)}) for split, text in texts.items()
    })


def load_text_files(files: dict[str, str], block_size: int):
    """Local text files (one split per file) as a ``DatasetDict`` with a ``text`` column.

    ``block_size`` only words the error for an empty file.
    """
    import datasets

    for split, path in files.items():
        if not Path(path).is_file():
            raise BWSKError(f"--{split}_file {path} does not exist; pass a readable text file")
        if Path(path).stat().st_size == 0:
            raise BWSKError(
                f"--{split}_file {path} is empty; one block of block_size {block_size} needs {block_size} tokens")
    return datasets.load_dataset("text", data_files=dict(files), keep_linebreaks=True, keep_in_memory=True)


def load_hub_text(source: HubText):
    """A Hub dataset's train / validation / test splits; an unreachable Hub becomes one BWSKError."""
    import datasets

    try:
        raw = datasets.load_dataset(source.name, source.config_name, keep_in_memory=True)
    except (ConnectionError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BWSKError(
            f"could not reach the Hugging Face Hub to load dataset {source.name!r} ({first_line}); "
            "--preset tiny or --train_file/--validation_file/--test_file work offline"
        ) from error
    missing = [split for split in SPLITS if split not in raw]
    if missing:
        raise BWSKError(
            f"dataset {source.name!r} has no {', '.join(missing)} split; "
            "pass --train_file/--validation_file/--test_file instead"
        )
    return raw.select_columns([source.text_column]).rename_column(source.text_column, "text")


def pack_blocks(raw, tokenizer, block_size: int):
    """Tokenise every split of ``raw``, concatenate it whole and cut it into ``block_size``-token blocks.

    The run_clm recipe, but over each whole split (not per map batch), so only the last partial
    block of a split is dropped. Labels equal the input ids (the model shifts them). A split too
    short for one block raises a BWSKError naming the token count it needs.
    """

    def tokenize(batch):
        # Lines longer than the model's context are fine here: they are cut into blocks below.
        return tokenizer(batch["text"], return_attention_mask=False, verbose=False)

    def concatenate_and_cut(batch):
        tokens = [token for line in batch["input_ids"] for token in line]
        usable = len(tokens) // block_size * block_size
        blocks = [tokens[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    packed = {}
    for split in raw:
        tokenized = raw[split].map(tokenize, batched=True, remove_columns=raw[split].column_names, keep_in_memory=True)
        n_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        if n_tokens < block_size:
            raise BWSKError(
                f"the {split} text has {n_tokens} tokens but one block of block_size {block_size} needs "
                f"{block_size}; give a longer {split} text or a smaller --block_size"
            )
        packed[split] = tokenized.map(
            concatenate_and_cut, batched=True, batch_size=None, remove_columns=["input_ids"], keep_in_memory=True
        )
    import datasets

    return datasets.DatasetDict(packed)

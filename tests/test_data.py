"""Data for the experiments: the offline corpus, the offline tokenizer, packing, and bad input."""

import re
from collections import Counter

import pytest

from hf_bwsk.errors import BWSKError
from hf_bwsk.experiments.data import (
    SPLITS,
    HubText,
    load_hub_text,
    load_text_files,
    pack_blocks,
    text_splits,
    tiny_corpus_slices,
    write_tiny_corpus_texts,
)
from hf_bwsk.experiments.tokenization import END_OF_TEXT, train_bpe_tokenizer

SMALL = 30_000  # characters of the stdlib corpus: enough for every slice, fast to tokenise


@pytest.fixture(scope="module")
def slices():
    return tiny_corpus_slices(SMALL)


@pytest.fixture(scope="module")
def tokenizer(slices):
    return train_bpe_tokenizer(slices["base"].splitlines(keepends=True), 300, model_max_length=32)


def paragraphs(text):
    return Counter(p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())


def test_corpus_slices_partition_the_stdlib_prose_5_3_1_1(slices):
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    corpus = paragraphs("\n\n".join(topics[name] for name in sorted(topics))[:SMALL])
    found = {name: paragraphs(text) for name, text in slices.items()}
    assert set(found) == {"base", *SPLITS}
    # Every paragraph lands in exactly one slice (a few paragraphs occur twice in the source).
    assert sum(found.values(), Counter()) == corpus
    for split in SPLITS:
        leaked = {p for p in found[split] if p in found["base"] and corpus[p] == 1}
        assert not leaked, f"{split} shares {len(leaked)} paragraphs with the base slice"
    counts = {name: sum(found_.values()) for name, found_ in found.items()}
    assert counts["base"] > counts["train"] > counts["validation"] > 0 and counts["test"] > 0, counts
    assert abs(counts["base"] / counts["validation"] - 5) < 1, counts


def test_tiny_corpus_files_hold_the_slices_and_read_back_as_the_in_memory_rows(tmp_path, slices):
    paths = write_tiny_corpus_texts(slices, tmp_path)
    assert sorted(paths) == sorted(slices)
    for name, path in paths.items():
        assert open(path, encoding="utf-8").read() == slices[name]
    from_files = load_text_files({split: str(paths[split]) for split in SPLITS}, 32)
    in_memory = text_splits({split: slices[split] for split in SPLITS})
    for split in SPLITS:
        assert in_memory[split]["text"] == from_files[split]["text"], f"{split}: rows differ"


def test_bpe_tokenizer_is_deterministic_and_lossless(slices, tokenizer):
    again = train_bpe_tokenizer(slices["base"].splitlines(keepends=True), 300, model_max_length=32)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == END_OF_TEXT
    unseen = slices["test"][:2000] + " naïve café ✓"
    ids = tokenizer(unseen)["input_ids"]
    assert tokenizer.decode(ids) == unseen, "byte-level BPE must round-trip any text"


def test_tokenizer_saves_and_loads(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The assert statement checks a condition."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token == END_OF_TEXT


def test_pack_blocks_concatenates_each_split_whole(tmp_path, slices, tokenizer):
    files = {}
    for split in SPLITS:
        files[split] = str(tmp_path / f"{split}.txt")
        open(files[split], "w", encoding="utf-8").write(slices[split])
    raw = load_text_files(files, 32)
    block = 32
    packed = pack_blocks(raw, tokenizer, block)
    for split in SPLITS:
        stream = [token for line in raw[split]["text"] for token in tokenizer(line)["input_ids"]]
        blocks = packed[split]
        assert len(blocks) == len(stream) // block, f"{split}: {len(blocks)} blocks for {len(stream)} tokens"
        flat = [token for ids in blocks["input_ids"] for token in ids]
        assert flat == stream[: len(flat)], f"{split}: blocks are not the split's token stream in order"
        assert all(len(ids) == block for ids in blocks["input_ids"])
        assert blocks["labels"] == blocks["input_ids"]
        assert all(sum(mask) == block for mask in blocks["attention_mask"])
    # Line breaks are kept, as run_clm does for text files.
    assert raw["train"]["text"][0].endswith("\n")


def test_too_short_split_names_the_tokens_one_block_needs(tmp_path, tokenizer):
    files = {split: str(tmp_path / f"{split}.txt") for split in SPLITS}
    for split, path in files.items():
        open(path, "w", encoding="utf-8").write("word " * 200 if split != "validation" else "two words\n")
    with pytest.raises(BWSKError, match=r"validation text has \d+ tokens but one block of block_size 64 needs 64"):
        pack_blocks(load_text_files(files, 64), tokenizer, 64)


def test_empty_split_is_refused(tmp_path, tokenizer):
    files = {split: str(tmp_path / f"{split}.txt") for split in SPLITS}
    for split, path in files.items():
        open(path, "w", encoding="utf-8").write("" if split == "test" else "word " * 200)
    with pytest.raises(BWSKError, match="--test_file .*test.txt is empty; one block of block_size 16 needs 16 tokens"):
        load_text_files(files, 16)


def test_missing_text_file_is_named(tmp_path):
    with pytest.raises(BWSKError, match="--train_file .*nowhere.txt does not exist"):
        load_text_files({"train": str(tmp_path / "nowhere.txt")}, 16)


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline mode makes the Hub unreachable at once, as a cut network does after its retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(BWSKError) as caught:
        load_hub_text(HubText("wikitext", "wikitext-2-raw-v1"))
    message = str(caught.value)
    assert "\n" not in message
    assert "could not reach the Hugging Face Hub" in message and "--preset tiny" in message, message

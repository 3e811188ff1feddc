"""The tokenized-text cache: one tokenization per (file, fields, tokenizer, length)."""

from __future__ import annotations

import pytest

from xmc.data.tokenized import tokenize_cached

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s"]


@pytest.fixture
def tokenizer(tmp_path):

    return _tokenizer_from_words(tmp_path / "tok", WORDS)


def _tokenizer_from_words(folder, words):
    """A real WordPiece tokenizer from a vocabulary folder (loadable by transformers 4 and 5 alike)."""
    from transformers import BertTokenizer

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


class CountingTokenizer:
    """Delegates to a real tokenizer and counts the calls that tokenize text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.backend_tokenizer = getattr(inner, "backend_tokenizer", None)

    def get_vocab(self):
        return self.inner.get_vocab()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_second_run_reads_the_cache_and_a_changed_file_is_retokenized(tmp_path, tokenizer):
    source = tmp_path / "train_texts.txt"
    source.write_text("the cat sat on the mat\ndogs\n")
    counting = CountingTokenizer(tokenizer)

    def texts():
        return source.read_text().splitlines()

    first = tokenize_cached(texts, counting, 6, [source], progress=False)
    assert counting.calls == 1
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = [WORDS.index(w) for w in ["the", "cat", "sat", "on"]]
    assert first["input_ids"][0] == [cls, *ids, sep]  # truncated to 6 with special tokens
    assert first["input_ids"][1] == [cls, WORDS.index("dog"), WORDS.index("##s"), sep]

    def fail():
        raise AssertionError("texts must not be read on a cache hit")

    second = tokenize_cached(fail, counting, 6, [source], progress=False)
    assert counting.calls == 1
    assert second["input_ids"] == first["input_ids"]
    assert second.cache_files == first.cache_files  # memory-mapped from the same Arrow file

    longer = tokenize_cached(texts, counting, 12, [source], progress=False)
    assert counting.calls == 2 and len(longer["input_ids"][0]) == 8

    source.write_text("the dog sat\n")
    changed = tokenize_cached(texts, counting, 6, [source], progress=False)
    assert counting.calls == 3
    assert changed["input_ids"] == [[cls, 5, 10, 7, sep]]


def test_the_key_covers_the_tokenizer_definition(tmp_path, tokenizer):
    source = tmp_path / "texts.txt"
    source.write_text("the cat\n")
    other = _tokenizer_from_words(tmp_path / "other", [*WORDS[:5], "cat", "the"])
    a = tokenize_cached(lambda: ["the cat"], tokenizer, 8, [source], progress=False)
    b = tokenize_cached(lambda: ["the cat"], other, 8, [source], progress=False)
    assert a["input_ids"] != b["input_ids"]

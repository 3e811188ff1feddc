"""The memory planner: estimates against hand-computed byte counts, the CLI, and --measure on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from xmc.cli import main
from xmc.memory.planner import (
    CUDA_RESERVE,
    ENCODERS,
    PRESETS,
    EncoderSpec,
    Plan,
    encoder_spec,
    estimate,
    fits,
    plan_from_config,
    preset_plan,
    report,
)
from xmc.runtime import resident_bytes

# A transformer small enough to count by hand: H=8, 1 layer, 2 heads, I=16, vocab 10, 4 positions, 2 types.
TINY = EncoderSpec("tiny", hidden=8, layers=1, heads=2, intermediate=16, vocab=10, positions=4, token_types=2)
# Parameters: embeddings (10 + 4 + 2) * 8 + 2 * 8 (layer norm) = 144; the layer: Q, K, V, output 4 * (64 + 8),
# two layer norms 2 * 16, feed-forward 8 * 16 + 16 + 16 * 8 + 8 = 280: 288 + 32 + 280 = 600. Total 744.
TINY_PARAMS = 744


def plan(**changes) -> Plan:
    base = Plan(labels=100, encoder=TINY, fan_in=2, batch=2, seq_len=4, precision="bf16", device="cuda")
    return replace(base, **changes)


def test_tiny_transformer_parameters_by_hand_and_against_the_real_model():
    assert TINY.num_parameters() == TINY_PARAMS
    from transformers import DistilBertConfig, RobertaConfig

    from xmc.encoders import TransformerEncoder

    configs = {
        "bert": (
            _tiny_bert_config(),
            TINY,
        ),
        "distilbert": (
            DistilBertConfig(
                vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=4
            ),
            replace(TINY, token_types=0),
        ),
        "roberta": (
            RobertaConfig(
                vocab_size=10,
                hidden_size=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=16,
                max_position_embeddings=6,
                type_vocab_size=1,
            ),
            replace(TINY, layers=2, positions=6, token_types=1),
        ),
    }
    for name, (hf, spec) in configs.items():
        real = sum(p.numel() for p in TransformerEncoder.from_config(hf).parameters())
        assert spec.num_parameters() == real, name


def test_every_component_by_hand_fp32_and_bf16_world_1_and_4():
    # Encoder: 744 parameters -> 4 * 744 bytes each for weights and gradients, 8 * 744 for AdamW.
    # Activations per layer, tokens = 2 * 4 = 8: bf16 (e=2) 8 * (8 * (12 + 10 + 2) + 2 * 2 * 16) = 2048,
    # fused attention's log-sum-exp 4 * 2 heads * 4 * 2 = 64; embeddings 8 * 8 * 9 = 576: 2688.
    # fp32 (e=4): 8 * (8 * (12 + 20 + 2) + 2 * 4 * 16) + 64 + 576 = 3840.
    # Classifier at world 1 (L=100, D=8, bias): dense 900 parameters, fixed fan-in K=2 300; one chunk
    # of 100 labels: logits 4 bytes * 2 rows * 100 * 4 buffers = 3200; int16 ids 100 * 2 * 2 = 400;
    # transpose 200 int32 slots + 9 int64 pointers = 872.
    # World 4: 25 labels per rank, 8 gathered rows: dense 225 parameters, fixed 75; logits 4 * 8 * 25 * 4.
    encoder = {"encoder parameters": 2976, "encoder gradients": 2976, "encoder optimizer": 5952}
    head = {"head parameters": 0, "head gradients": 0, "head optimizer": 0}
    for precision, activations in (("bf16", 2688), ("fp32", 3840)):
        for world, dense_p, fixed_p, logits, ids, transpose in (
            (1, 900, 300, 3200, 400, 872),
            (4, 225, 75, 3200, 100, 272),
        ):
            got = estimate(plan(precision=precision, world_size=world), ("dense", "fixed_fanin"))
            common = {**encoder, "encoder activations": activations, **head}
            assert got["dense"] == {
                **common,
                "classifier weights": 4 * dense_p,
                "classifier master_weights": 0,
                "classifier gradients": 4 * dense_p,
                "classifier optimizer": 8 * dense_p,
                "classifier logits": logits,
                "classifier chunk_gradient": 0,
            }, (precision, world)
            assert got["fixed_fanin"] == {
                **common,
                "classifier weights": 4 * fixed_p,
                "classifier indices": ids,
                "classifier transpose": transpose,
                "classifier master_weights": 0,
                "classifier gradients": 4 * fixed_p,
                "classifier optimizer": 8 * fixed_p,
                "classifier logits": logits,
                "classifier chunk_gradient": 0,
            }, (precision, world)


def test_classifier_state_bytes_in_half_precision_and_with_master_weights():
    from xmc.classifiers import DenseClassifier, FixedFanInClassifier

    dense = DenseClassifier.state_bytes(
        8, 100, batch_size=2, param_bytes=2, master_weights=True, optimizer="sgd"
    )
    assert (dense["weights"], dense["gradients"], dense["master_weights"], dense["optimizer"]) == (
        1800,
        1800,
        3600,
        3600,
    )
    fixed = FixedFanInClassifier.state_bytes(8, 100, batch_size=2, param_bytes=2, fan_in=2, bias=False)
    assert (fixed["weights"], fixed["gradients"], fixed["optimizer"]) == (400, 400, 1600)
    # A built classifier reports the same as its class asked about its shape.
    built = FixedFanInClassifier(8, 100, 2).memory(batch_size=2)
    assert built == FixedFanInClassifier.state_bytes(8, 100, batch_size=2, fan_in=2)


def test_chunk_gradient_counted_only_when_labels_take_several_chunks():
    from xmc.classifiers.chunked import CHUNK_ELEMENTS, label_chunk

    one = estimate(plan(labels=1000, batch=8), ("dense",))["dense"]
    assert one["classifier chunk_gradient"] == 0
    labels = 3 * CHUNK_ELEMENTS // 8
    many = estimate(plan(labels=labels, batch=8), ("dense",))["dense"]
    assert many["classifier chunk_gradient"] == label_chunk(labels, 8) * 9 * 4


def test_gradient_checkpointing_accumulation_and_heads():
    deep = replace(TINY, layers=4)
    full = estimate(plan(encoder=deep, batch=16, seq_len=64), ("dense",))["dense"]
    ckpt_plan = plan(encoder=deep, batch=16, seq_len=64, gradient_checkpointing=True)
    ckpt = estimate(ckpt_plan, ("dense",))["dense"]
    assert ckpt["encoder activations"] < full["encoder activations"]
    accum = estimate(plan(grad_accum=2), ("dense",))["dense"]
    assert accum["classifier accumulation"] == accum["classifier gradients"]
    heads = estimate(plan(intermediate=16, meta_clusters=5), ("fixed_fanin",))["fixed_fanin"]
    # Intermediate 8 -> 16: 8 * 16 + 16 = 144 parameters; meta head 5 * (16 + 1) = 85.
    assert heads["head parameters"] == 4 * (144 + 85)
    assert heads["head optimizer"] == 8 * (144 + 85)
    sparse = estimate(plan(intermediate=16, intermediate_fan_in=3), ("fixed_fanin",))["fixed_fanin"]
    # A fixed fan-in intermediate layer: 16 * 3 + 16 = 64 parameters and 16 * 3 int16 ids.
    assert sparse["head parameters"] == 4 * 64 and sparse["head ids"] == 2 * 48


def test_estimates_never_build_the_model():
    before, _ = resident_bytes()
    data = report(Plan(labels=2_812_281, fan_in=64, batch=128))
    after, _ = resident_bytes()
    dense = data["backends"]["dense"]["components"]["classifier weights"]
    assert dense == 4 * (2_812_281 * 768 + 2_812_281)  # 8 GiB described ...
    assert after - before < 64 * 2**20  # ... without allocating it


def test_fits_subtracts_the_cuda_reserve():
    room = fits(8 * 2**30 - CUDA_RESERVE)
    assert room[8] == 0 and room[12] == 4 * 2**30


def test_presets_use_their_real_label_counts_and_configs():
    for name, (_, labels) in PRESETS.items():
        p = preset_plan(name)
        assert p.labels == labels and p.encoder.kind == "transformer"
    amazon = preset_plan("amazon-3m")
    assert (amazon.batch, amazon.grad_accum, amazon.fan_in, amazon.precision) == (128, 2, 128, "bf16")
    assert amazon.encoder == ENCODERS["bert-base"]
    titles = preset_plan("lf-amazontitles-1.3m")
    assert titles.encoder.layers == 6 and titles.seq_len == 32 and titles.optimizer == "sgd"


def test_plan_from_a_bow_config_reads_the_header(tmp_path):
    from xmc.config import load_config

    train = tmp_path / "train.txt"
    train.write_text("2 50 7\n0,3 1:1 4:2\n6 0:1\n")
    overrides = [f"data.train={train}", "data.labels=null", "encoder.dim=32", "classifier.fan_in=4"]
    config = load_config(None, overrides)
    p = plan_from_config(config)
    assert (p.labels, p.encoder.kind, p.encoder.features, p.encoder.hidden) == (7, "bow", 50, 32)
    assert p.encoder.num_parameters() == 50 * 32 + 32


def _tiny_bert_config():
    """A BERT config of TINY's shape (8 wide, 1 layer, 2 token types)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=4,
        type_vocab_size=2,
    )


def _tiny_bert_model():
    """A random BERT of TINY's shape, as a Hugging Face model."""
    from transformers import BertModel

    return BertModel(_tiny_bert_config())


def test_encoder_spec_from_a_local_folder_counts_the_safetensors(tmp_path):
    model = _tiny_bert_model()
    model.save_pretrained(tmp_path)
    spec = encoder_spec(str(tmp_path))
    assert spec.hidden == 8 and spec.layers == 1
    assert spec.num_parameters() == TINY_PARAMS  # the pooler in the file is excluded
    assert encoder_spec("models/bert-base-uncased") == ENCODERS["bert-base"]
    with pytest.raises(ValueError, match="unknown encoder"):
        encoder_spec("no-such-model")


def test_encoder_spec_counts_a_fips_folder_by_its_compressed_mlps(tmp_path):
    from xmc.compress.fips import save_compressed
    from xmc.compress.fit import compress_mlps

    model = _tiny_bert_model()
    compress_mlps(model, None, sparsity=0.5, rank=3, group_size=1)  # SVD only: no activations needed
    save_compressed(model, None, tmp_path, {})
    # The dense MLP weights 2 * 8 * 16 = 256 become a base 8 * 3 and two factors of 3 * 16 / 2 nonzeros.
    assert encoder_spec(str(tmp_path)).num_parameters() == TINY_PARAMS - 256 + 8 * 3 + 2 * 24


def test_cli_prints_both_backends_and_the_cards(capsys):
    assert main(["memory", "--labels", "2812281", "--hidden", "768", "--fan-in", "64", "--batch", "128"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "dense" in line)
    assert "fixed_fanin" in header
    for card in (8, 12, 16, 24, 40, 48, 80):
        assert f"\n{card} GB" in out
    # 2.8M x 768 dense in fp32 with AdamW: 32 GiB of classifier state; it fits only the 48 and 80 GB cards.
    dense_fit = [line.split()[2] for line in out.splitlines() if line.endswith("GiB") and " GB " in line]
    assert dense_fit == ["no", "no", "no", "no", "no", "yes", "yes"]


def test_cli_json_plot_and_world_size(tmp_path, capsys):
    png = tmp_path / "chart.png"
    assert (
        main(
            ["memory", "--preset", "all", "--json", "--plot", str(png), "--backends", "dense", "fixed_fanin"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert [d["plan"]["name"] for d in data] == list(PRESETS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(["memory", "--preset", "amazon-3m", "--world-size", "4", "--json", "--backends", "dense"]) == 0
    )
    four = json.loads(capsys.readouterr().out)
    assert four["plan"]["labels_per_rank"] == 703_071
    one = report(preset_plan("amazon-3m"), ("dense",))
    assert (
        four["backends"]["dense"]["components"]["classifier weights"]
        < one["backends"]["dense"]["components"]["classifier weights"] / 3.9
    )


def test_cli_errors_name_the_fix(capsys):
    assert main(["memory", "--hidden", "768"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["memory", "--labels", "1000", "--encoder", "bert-base", "--hidden", "512"]) == 2
    assert "--intermediate 512" in capsys.readouterr().err
    assert main(["memory", "--preset", "wiki-1b"]) == 2
    assert "amazon-3m" in capsys.readouterr().err
    assert main(["memory", "--labels", "1000", "--fan-in", "1000"]) == 2
    assert "--fan-in" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_on_cpu_matches_the_estimate_within_a_quarter():
    """A tiny transformer, dense, L = 200,000 (estimate >= 1 GiB): resident-set growth within 25%."""
    command = [
        sys.executable,
        "-m",
        "xmc",
        "memory",
        "--encoder",
        "bert-tiny",
        "--labels",
        "200000",
        "--intermediate",
        "512",
        "--batch",
        "8",
        "--seq-len",
        "32",
        "--precision",
        "fp32",
        "--backends",
        "dense",
        "--measure",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--json",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)["measured"]
    assert result["estimate_bytes"] >= 2**30
    assert 0.75 <= result["ratio"] <= 1.25, result
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_cli_config_with_overrides(tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text("2 50 7\n0,3 1:1 4:2\n6 0:1\n")
    from xmc.config import default_config_path

    bibtex = default_config_path().parent / "bibtex.yaml"
    assert (
        main(
            [
                "memory",
                "--config",
                str(bibtex),
                f"data.train={train}",
                "encoder.dim=32",
                "classifier.fan_in=4",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["labels"] == 7 and data["plan"]["encoder"]["features"] == 50
    assert main(["memory", "--labels", "5", "data.test=x"]) == 2
    assert "--config" in capsys.readouterr().err


def test_bf16_classifier_state_halves_the_classifier_state():
    from xmc.memory.planner import Plan, estimate

    fp32, bf16 = (
        estimate(Plan(labels=100_000, fan_in=64, batch=32, classifier_state=state))
        for state in ("fp32", "bf16")
    )
    for name in ("dense", "fixed_fanin"):
        for part in ("weights", "gradients", "optimizer"):
            assert bf16[name][f"classifier {part}"] * 2 == fp32[name][f"classifier {part}"], (name, part)
        assert (
            bf16[name]["classifier indices" if name == "fixed_fanin" else "classifier logits"]
            == (fp32[name]["classifier indices" if name == "fixed_fanin" else "classifier logits"])
        )
    assert bf16["rps"] == fp32["rps"]  # RPS keeps fp32 state
    with pytest.raises(ValueError, match="use --optimizer adamw"):
        estimate(Plan(labels=10, fan_in=4, classifier_state="bf16", optimizer="sgd"))


@pytest.mark.slow
def test_measure_bf16_classifier_state_on_cpu_within_a_quarter():
    """--classifier-state bf16 trains bf16 weights and moments; fixed fan-in's resident-set growth is within
    25% of the estimate. (The dense classifier forms its gradient in fp32 before rounding it when the
    activations are fp32, as on this CPU path: a transient the estimate does not count.)"""
    command = [sys.executable, "-m", "xmc", "memory", "--encoder", "bert-tiny", "--labels", "200000"]
    command += ["--intermediate", "512", "--batch", "8", "--seq-len", "32", "--precision", "fp32"]
    command += ["--fan-in", "16", "--backends", "fixed_fanin", "--classifier-state", "bf16"]
    command += ["--measure", "--device", "cpu"]
    command += ["--steps", "2", "--json"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)["measured"]
    assert 0.75 <= result["ratio"] <= 1.25, result


def test_dense_head_row_counts_the_head_dense_and_the_tail_sparse_by_hand():
    """L = 100, D = 8, K = 2, a head of 10 labels, fp32 AdamW: head 10 x (8 + 1) values, tail 90 x (2 + 1)
    values and 90 x 2 int16 ids (their column view: 180 int32 slots and 9 int64 pointers), 16 bytes a label
    of permutation; each value weighs 4 (weight) + 4 (gradient) + 8 (moments)."""
    parts = estimate(plan(dense_head=10, precision="fp32"), ("fixed_fanin",))["fixed_fanin"]
    head = {k: v for k, v in parts.items() if k.startswith("classifier head_")}
    tail = {k: v for k, v in parts.items() if k.startswith("classifier tail_")}
    assert head["classifier head_weights"] == 4 * 10 * 9 and head["classifier head_optimizer"] == 8 * 10 * 9
    assert tail["classifier tail_weights"] == 4 * 90 * 3 and tail["classifier tail_indices"] == 2 * 90 * 2
    assert tail["classifier tail_transpose"] == 4 * 180 + 8 * 9
    assert parts["classifier label_order"] == 16 * 100
    frozen = estimate(plan(dense_head=10, head_trained=False, precision="fp32"), ("fixed_fanin",))
    head = {k: v for k, v in frozen["fixed_fanin"].items() if k.startswith("classifier head_")}
    assert head == {"classifier head_weights": 4 * 10 * 9}  # an SVM head: no gradient, no moments
    with pytest.raises(ValueError, match="--dense-head must lie in 0..100"):
        estimate(plan(dense_head=101))


def test_plan_from_a_config_takes_its_dense_head(tmp_path):
    from xmc.config import ClassifierConfig, Config

    config = Config(classifier=ClassifierConfig(dense_head=40))
    config.encoder.type, config.encoder.dim = "features", 16
    assert plan_from_config(config, labels=500).dense_head == 40
    assert plan_from_config(config, labels=500).head_trained
    config.classifier.head_fit = "svm"
    assert not plan_from_config(config, labels=500).head_trained

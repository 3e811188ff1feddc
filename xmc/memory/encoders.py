"""Encoder shapes for the memory planner (:mod:`xmc.memory.planner`): presets of the Hugging Face base
models the anchors use, bag-of-words and precomputed-feature encoders, and local model folders sized from
their ``config.json`` (and, when present, the exact parameter count in ``model.safetensors``' header)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class EncoderSpec:
    """The shape of an encoder. ``kind``: transformer, bow (``features`` = its input width F) or
    features (precomputed embeddings, no parameters)."""

    name: str
    kind: str = "transformer"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    positions: int = 512
    token_types: int = 2
    features: int = 0
    params: int | None = None  # exact count when known (e.g. read from a safetensors header)

    def num_parameters(self) -> int:
        if self.params is not None:
            return self.params
        if self.kind == "bow":
            return self.features * self.hidden + self.hidden
        if self.kind == "features":
            return 0
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocab + self.positions + self.token_types) * h + 2 * h
        layer = 4 * h * h + 2 * h * i + 9 * h + i
        return embeddings + self.layers * layer


# Hugging Face base models the anchors use, plus the bundled MiniLM and a tiny BERT for tests.
ENCODERS = {
    "bert-base": EncoderSpec("bert-base"),
    "bert-large": EncoderSpec("bert-large", hidden=1024, layers=24, heads=16, intermediate=4096),
    "distilbert-base": EncoderSpec("distilbert-base", layers=6, token_types=0),
    "roberta-base": EncoderSpec("roberta-base", vocab=50265, positions=514, token_types=1),
    "distilroberta-base": EncoderSpec(
        "distilroberta-base", layers=6, vocab=50265, positions=514, token_types=1
    ),
    "minilm": EncoderSpec("minilm", hidden=384, layers=6, heads=12, intermediate=1536),
    "bert-tiny": EncoderSpec("bert-tiny", hidden=128, layers=2, heads=2, intermediate=512),
}
_ALIASES = {
    "bert-base-uncased": "bert-base",
    "bert-base-cased": "bert-base",
    "bert-large-uncased": "bert-large",
    "distilbert-base-uncased": "distilbert-base",
    "all-minilm-l6-v2": "minilm",
}


def encoder_spec(name: str, hidden: int | None = None) -> EncoderSpec:
    """An encoder by preset name, ``bow:F`` (bag-of-words over F features into ``hidden``),
    ``features`` (precomputed ``hidden``-wide embeddings), or a local Hugging Face folder (its
    ``config.json``, and the exact parameter count from ``model.safetensors`` when present; a
    FiPS-compressed folder counts its MLPs' shared bases and factor nonzeros, not their dense products)."""
    key = name.lower()
    if key.startswith("bow:"):
        try:
            features = int(key[4:].replace(",", "").replace("_", ""))
        except ValueError:
            raise ValueError(f"--encoder {name}: write bow:F with F the number of input features") from None
        return EncoderSpec(name, kind="bow", hidden=hidden or 256, features=features, layers=0)
    if key == "features":
        if not hidden:
            raise ValueError("--encoder features needs --hidden (the width of the precomputed embeddings)")
        return EncoderSpec(name, kind="features", hidden=hidden, layers=0)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return _spec_from_folder(path)
    base = _ALIASES.get(Path(key).name, Path(key).name)
    if base in ENCODERS:
        return ENCODERS[base]
    raise ValueError(
        f"unknown encoder {name!r}: name a preset ({', '.join(ENCODERS)}), bow:F, features, or a local "
        "Hugging Face model folder with a config.json"
    )


def _spec_from_folder(path: Path) -> EncoderSpec:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))

    def get(*keys, default=None):
        for k in keys:
            if k in cfg:
                return int(cfg[k])
        if default is None:
            raise ValueError(f"{path}/config.json lacks {keys[0]}: cannot size this encoder")
        return default

    hidden = get("hidden_size", "dim", "d_model")
    spec = EncoderSpec(
        str(path),
        hidden=hidden,
        layers=get("num_hidden_layers", "n_layers", "num_layers"),
        heads=get("num_attention_heads", "n_heads", default=max(1, hidden // 64)),
        intermediate=get("intermediate_size", "hidden_dim", "ffn_dim", default=4 * hidden),
        vocab=get("vocab_size"),
        positions=get("max_position_embeddings", default=512),
        token_types=get("type_vocab_size", default=0),
    )
    weights, compressed = path / "model.safetensors", path / "fips.safetensors"
    fips = cfg.get("xmc_fips")
    if fips and weights.is_file() and compressed.is_file():
        # FiPS (xmc.compress.fips): the compressed MLPs' floating tensors (bases, factor values, biases) from
        # fips.safetensors, everything else from model.safetensors (which, in format 1, also held the
        # dense MLP products: left out)
        extra = _safetensors_header(compressed)
        mlps = {key[: key.rfind(".") + 1] for key in extra if not key.startswith("fips_bases.")}
        rest = {k: v for k, v in _safetensors_header(weights).items() if k[: k.rfind(".") + 1] not in mlps}
        floating = {k: v for k, v in extra.items() if v["dtype"] in ("F64", "F32", "F16", "BF16")}
        return replace(spec, params=_count(rest) + _count(floating))
    if weights.is_file():
        spec = replace(spec, params=_count(_safetensors_header(weights)))
    if fips:  # MLPs compressed by FiPS: shared bases and factor nonzeros replace the dense weights
        dense = 2 * spec.layers * spec.hidden * spec.intermediate
        shared = sum(hidden * r for r in fips["ranks"]) + sum(map(sum, fips["nnz"]))
        spec = replace(spec, params=spec.num_parameters() - dense + shared)
    return spec


def _safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors' entries (``dtype``, ``shape``) of a safetensors file, read from its header alone."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def _count(entries: dict[str, dict]) -> int:
    """Parameters of header entries (the pooler excluded: the encoder drops it)."""
    return sum(math.prod(entry["shape"]) for key, entry in entries.items() if "pooler" not in key)

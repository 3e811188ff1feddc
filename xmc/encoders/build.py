"""Build the configured encoder and the inputs of every split, and run an encoder over a split."""

from __future__ import annotations

import logging

import numpy as np
import torch

from xmc.config import EncoderConfig
from xmc.data.source import SplitSource, cache_identity
from xmc.encoders.base import Encoder, Inputs
from xmc.encoders.bow import BowEncoder, BowInputs, build_vocabulary, count_matrix, fit_weights, tfidf
from xmc.encoders.features import FeaturesEncoder, FeaturesInputs
from xmc.encoders.transformer import (
    TransformerEncoder,
    build_token_inputs,
    load_tokenizer,
    resolve_model_path,
)
from xmc.progress import bars

log = logging.getLogger(__name__)

TRAIN = "train"  # the split vocabularies and IDF statistics are fitted on


def _kind(split: SplitSource) -> str:
    """What a split holds: ``bow`` features, raw ``text``, precomputed ``features`` or nothing."""
    if split.X is not None:
        return "bow"
    if split.texts is not None:
        return "text"
    if split.features is not None:
        return "features"
    return "nothing"


_HOLDS = {
    "bow": "bag-of-words features",
    "text": "raw text",
    "features": "precomputed embeddings",
    "nothing": "no inputs",
}
_FIX = {
    "bow": "use encoder.type=bow",
    "text": "use encoder.type=transformer or encoder.type=bow",
    "features": "use encoder.type=features",
    "nothing": "give the split X, texts or features",
}
_NEEDS = {
    "bow": ("bow", "text"),
    "transformer": ("text",),
    "features": ("features",),
}
_NEED_WORDS = {
    "bow": "bag-of-words features or raw text",
    "transformer": "raw text to tokenize",
    "features": "precomputed embeddings (data.format=features, .npy files)",
}


def _check_fit(encoder_type: str, splits: dict[str, SplitSource]) -> str:
    """The kind of data shared by every split, after checking it suits ``encoder_type``."""
    if encoder_type not in _NEEDS:
        raise ValueError(f"encoder.type must be one of {', '.join(_NEEDS)}, got {encoder_type!r}")
    if not splits:
        raise ValueError("no data splits given")
    kinds = {name: _kind(split) for name, split in splits.items()}
    for name, kind in kinds.items():
        if kind not in _NEEDS[encoder_type]:
            raise ValueError(
                f"encoder.type={encoder_type} needs {_NEED_WORDS[encoder_type]}, but split '{name}' "
                f"holds {_HOLDS[kind]}: {_FIX[kind]}"
            )
    if len(set(kinds.values())) > 1:
        raise ValueError(f"all splits must hold the same kind of data, got {kinds}")
    return next(iter(kinds.values()))


def build_encoder_and_inputs(
    config: EncoderConfig,
    splits: dict[str, SplitSource],
    progress: bool = True,
    tokenizer=None,
) -> tuple[Encoder, dict[str, Inputs]]:
    """The encoder described by ``config`` and an inputs object per split.

    Args:
        config: the ``encoder`` section of the training config.
        splits: split name -> what it provides; ``"train"`` fits the bow vocabulary and IDF.
        progress: show progress bars for tokenization.
        tokenizer: transformer only: use this tokenizer instead of the one saved with the model.

    Raises ``ValueError`` when ``config.type`` does not fit the data (with the type to use instead)
    and ``FileNotFoundError`` for a missing model folder. With ``config.freeze`` the encoder's
    parameters are returned with ``requires_grad=False``.
    """
    kind = _check_fit(config.type, splits)
    if config.type == "bow":
        encoder, inputs = _build_bow(config, splits, kind)
    elif config.type == "transformer":
        encoder, inputs = _build_transformer(config, splits, progress, tokenizer)
    else:
        encoder, inputs = _build_features(config, splits)
    if config.freeze:
        encoder.requires_grad_(False)
    return encoder, inputs


def _build_bow(
    config: EncoderConfig, splits: dict[str, SplitSource], kind: str
) -> tuple[BowEncoder, dict[str, Inputs]]:
    if TRAIN not in splits:
        raise ValueError(f"the bow encoder fits its IDF (and vocabulary) on a '{TRAIN}' split; none given")
    if kind == "bow":
        counts = {name: split.X for name, split in splits.items()}
    else:
        train = splits[TRAIN]
        sources, variant = cache_identity(train)
        vocabulary = build_vocabulary(
            train.texts, sources, config.vocab_size, config.min_df, variant, config.ngrams
        )
        if not vocabulary:
            raise ValueError(
                f"the training texts hold no term in at least encoder.min_df={config.min_df} documents: "
                "lower encoder.min_df"
            )
        counts = {name: count_matrix(split.texts(), vocabulary) for name, split in splits.items()}
    idf = fit_weights(counts[TRAIN], config.weighting)
    inputs: dict[str, Inputs] = {name: BowInputs(tfidf(X, idf)) for name, X in counts.items()}
    if config.dim:
        log.info("bow encoder: %d features -> %d dims", len(idf), config.dim)
    else:
        log.info("bow encoder: the %d-feature TF-IDF vector itself (encoder.dim=0)", len(idf))
    encoder = BowEncoder(len(idf), config.dim, config.dropout, config.activation)
    encoder.set_weighting(idf, None if kind == "bow" else vocabulary)
    return encoder, inputs


def _build_transformer(
    config: EncoderConfig, splits: dict[str, SplitSource], progress: bool, tokenizer
) -> tuple[TransformerEncoder, dict[str, Inputs]]:
    path = resolve_model_path(config.name_or_path)
    encoder = TransformerEncoder.from_pretrained(
        path, config.pooling, config.dropout, config.gradient_checkpointing
    )
    limit = encoder.max_positions
    if limit is not None and config.max_length > limit:
        raise ValueError(
            f"encoder.max_length={config.max_length} exceeds the {limit} positions of the model at {path}: "
            f"set encoder.max_length<={limit}"
        )
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    inputs: dict[str, Inputs] = {
        name: build_token_inputs(split, tokenizer, config.max_length, progress)
        for name, split in splits.items()
    }
    return encoder, inputs


def _build_features(
    config: EncoderConfig, splits: dict[str, SplitSource]
) -> tuple[FeaturesEncoder, dict[str, Inputs]]:
    inputs = {name: FeaturesInputs(split.features) for name, split in splits.items()}
    dims = {name: x.dim for name, x in inputs.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"the splits' embeddings differ in width: {dims}")
    return FeaturesEncoder(next(iter(dims.values())), config.dropout), dict(inputs)


@torch.no_grad()
def encode_all(
    encoder: Encoder,
    inputs: Inputs,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    order: np.ndarray | None = None,
    progress: bool = True,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Every document's representation, in eval mode: ``(N, out_features)`` of ``dtype``, row i for
    document i.

    ``order`` (a permutation of the rows, e.g. by length so batches pad little) only changes the
    order of the work, not of the result. The encoder's training mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    n = len(inputs)
    order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    out = np.empty((n, encoder.out_features), dtype=dtype)
    was_training = encoder.training
    encoder.eval()
    try:
        shown = bars(progress)
        for start in tqdm(range(0, n, batch_size), desc="embedding", unit="batch", disable=not shown):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device, non_blocking=True) for k, v in inputs.batch(rows).items()}
            out[rows] = encoder(batch).float().cpu().numpy().astype(dtype, copy=False)
    finally:
        encoder.train(was_training)
    return out

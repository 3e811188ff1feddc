"""Text encoders that feed the classifier: bag-of-words, transformer, precomputed features.

Every encoder is an ``nn.Module`` with ``out_features`` and ``forward(batch) -> (B, out_features)``;
every inputs object has ``__len__`` and ``batch(rows) -> dict[str, Tensor]`` (CPU tensors).
:func:`build_encoder_and_inputs` builds both from an :class:`~xmc.config.EncoderConfig`.
"""

from xmc.encoders.base import Encoder, Inputs
from xmc.encoders.bow import (
    BowEncoder,
    BowInputs,
    build_vocabulary,
    count_matrix,
    fit_idf,
    fit_weights,
    tfidf,
)
from xmc.encoders.build import build_encoder_and_inputs, encode_all
from xmc.encoders.features import FeaturesEncoder, FeaturesInputs, load_features
from xmc.encoders.transformer import (
    TokenInputs,
    TransformerEncoder,
    build_token_inputs,
    load_tokenizer,
    resolve_model_path,
)

__all__ = [
    "BowEncoder",
    "BowInputs",
    "Encoder",
    "FeaturesEncoder",
    "FeaturesInputs",
    "Inputs",
    "TokenInputs",
    "TransformerEncoder",
    "build_encoder_and_inputs",
    "build_token_inputs",
    "build_vocabulary",
    "count_matrix",
    "encode_all",
    "fit_idf",
    "fit_weights",
    "load_features",
    "load_tokenizer",
    "resolve_model_path",
    "tfidf",
]

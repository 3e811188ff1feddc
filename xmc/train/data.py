"""Loading a run's splits from ``DataConfig``: labels, encoder sources, the dev carve-out.

Each named source (``train``, ``dev``, ``test``) is read once; a split is a source plus the rows it
uses, so a validation split carved from train shares train's encoder inputs (one tokenization, one
feature matrix) and differs only in its rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from xmc.config import DataConfig
from xmc.data import (
    detect_format,
    label_vocabulary,
    load_labels,
    read_bow,
    read_filter_labels,
    read_label_names,
    read_lf_json,
    read_split,
    read_text_pairs,
    split_pair,
)
from xmc.data.source import SplitSource


@dataclass
class Split:
    """Rows ``rows`` of source ``source`` with their labels ``Y`` (CSR (len(rows), L))."""

    name: str
    source: str
    rows: np.ndarray
    Y: sp.csr_matrix
    exclude: sp.csr_matrix | None = None


@dataclass
class LoadedData:
    sources: dict[str, SplitSource]
    splits: dict[str, Split]
    num_labels: int
    label_names: list[str] | None
    format: str


def _require(path: str, key: str) -> None:
    for part in path.split(",") if split_pair(path) else [path]:
        if not os.path.exists(part):
            raise FileNotFoundError(f"{key}: {part} not found; point {key}=PATH at the file")


def load_data(config: DataConfig, seed: int) -> LoadedData:
    """Read the configured splits; labels and feature counts come from the files, never the config."""
    if not config.train:
        raise FileNotFoundError("data.train is not set; pass data.train=PATH (and data.test=PATH)")
    paths = {"train": config.train, "dev": config.dev, "test": config.test}
    paths = {name: p for name, p in paths.items() if p}
    for name, path in paths.items():
        _require(path, f"data.{name}")
    fmt = config.format
    if fmt == "auto":
        fmt = "features" if config.train.split(",")[0].endswith(".npy") else detect_format(config.train)
    names = None
    sources: dict[str, SplitSource] = {}
    labels: dict[str, sp.csr_matrix] = {}
    if fmt == "text":
        label_files = [split_pair(p)[1] for p in paths.values()]
        names = label_vocabulary(label_files, config.labels)
    elif config.labels:
        names = read_label_names(config.labels)
    for name, path in paths.items():
        sources[name], labels[name] = read_source(fmt, path, config, names)
    num_labels = labels["train"].shape[1]
    for name, Y in labels.items():
        if Y.shape[1] != num_labels:
            raise ValueError(
                f"data.{name} has {Y.shape[1]} labels but data.train has {num_labels}: "
                "the splits must share one label space (pass data.labels for LF JSON)"
            )
    splits = {name: Split(name, name, np.arange(Y.shape[0]), Y) for name, Y in labels.items()}
    if "dev" not in splits and config.dev_fraction > 0:
        splits["train"], splits["dev"] = _carve(splits["train"], config.dev_fraction, seed)
    if config.exclude_test and "test" in splits:
        test = splits["test"]
        test.exclude = read_filter_labels(config.exclude_test, test.Y.shape[0], num_labels)
    return LoadedData(sources, splits, num_labels, names, fmt)


def read_source(
    fmt: str, path: str, config: DataConfig, names: list[str] | None, labels_file: str | None = None
) -> tuple[SplitSource, sp.csr_matrix]:
    """One file (or pair) of format ``fmt`` as ``(SplitSource, Y)``; ``names`` is the label
    vocabulary where one is known (it fixes L)."""
    pair = split_pair(path)
    if fmt == "bow":
        X, Y = read_bow(path)
        return SplitSource(X=X, sources=[path]), Y
    if fmt == "split":
        if pair is None:
            raise ValueError(f"{path}: the split format takes 'X_Xf.txt,X_Y.txt'")
        X, Y = read_split(*pair)
        return SplitSource(X=X, sources=list(pair)), Y
    if fmt == "lf-json":
        data = read_lf_json(path, num_labels=None if names is None else len(names), label_file=None)
        fields = tuple(config.text_fields)
        return SplitSource(texts=lambda: data.texts(fields), sources=[path], variant=",".join(fields)), data.Y
    if fmt == "text":
        if pair is None:
            raise ValueError(f"{path}: the text format takes 'texts.txt,labels.txt'")
        data = read_text_pairs(pair[0], pair[1], names, config.labels)
        return SplitSource(texts=lambda: data.titles, sources=[pair[0]]), data.Y
    if fmt == "features":
        if pair is None:
            raise ValueError(
                f"{path}: the features format takes 'EMBEDDINGS.npy,LABELS' (labels in any format)"
            )
        features = np.load(pair[0], mmap_mode="r")
        Y = load_labels(pair[1], labels_file=labels_file or config.labels)
        if features.ndim != 2 or features.shape[0] != Y.shape[0]:
            raise ValueError(f"{pair[0]}: expected ({Y.shape[0]}, d) embeddings, got shape {features.shape}")
        return SplitSource(features=features, sources=list(pair)), Y
    raise ValueError(f"unknown data.format {fmt!r}")


def _carve(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of train (seeded) as the validation split."""
    n = len(train.rows)
    count = int(round(fraction * n))
    if not 0 < count < n:
        raise ValueError(f"data.dev_fraction={fraction} leaves no training or no validation rows of {n}")
    order = np.random.default_rng([seed, 0xDE5]).permutation(n)
    dev_rows, train_rows = np.sort(order[:count]), np.sort(order[count:])
    return (
        Split("train", train.source, train.rows[train_rows], train.Y[train_rows]),
        Split("dev", train.source, train.rows[dev_rows], train.Y[dev_rows]),
    )

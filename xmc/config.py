"""Training configuration: typed dataclasses are the schema, YAML files in ``configs/`` are instances.

``load_config(path, overrides)`` reads a YAML file, applies ``key=value`` overrides with dotted keys
(``train.epochs=3``, values parsed as YAML), rejects unknown keys with a suggestion, checks types and
choices, and returns a :class:`Config`. ``save_config`` writes the resolved config into a run folder.
Every default says what it trades off.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, value out of range. The message names the key."""


@dataclass
class DataConfig:
    train: str = ""  # training split: a file, or "FIRST,SECOND" for two-file formats
    dev: str | None = None  # validation split for model selection; None: carve dev_fraction from train
    dev_fraction: float = 0.1  # share of train held out when dev is None (0 disables validation)
    test: str | None = None  # reported, never used for selection
    format: str = "auto"  # bow, split, lf-json, text, features (precomputed .npy embeddings), or auto
    labels: str | None = None  # label file (lbl.json.gz, or a vocabulary for text pairs); fixes L
    exclude_test: str | None = None  # filter_labels_test.txt of LF sets: pairs dropped before scoring
    text_fields: list[str] = field(default_factory=lambda: ["title", "content"])  # LF JSON fields encoded
    propensity: str = "other"  # inverse-propensity preset for PSP@k: wikipedia, amazon or other


@dataclass
class EncoderConfig:
    type: str = "bow"  # bow (TF-IDF into a learned projection), transformer, or features (.npy)
    name_or_path: str = "minilm"  # transformer: a local folder, or "minilm" for the bundled MiniLM-L6
    pooling: str = "mean"  # transformer pooling: cls or mean (masked mean over tokens)
    max_length: int = 128  # tokens per document; longer = more context, quadratic attention cost
    dropout: float = 0.1  # on the pooled representation; the anchors use 0.35-0.7 on large sets
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower steps
    dim: int = 256  # bow encoder: width of the learned projection of the TF-IDF vector (0: the vector itself)
    activation: str = "none"  # bow encoder: none (linear projection), relu, gelu or tanh after it
    weighting: str = "tfidf"  # bow encoder: tfidf (log1p(tf) * idf) or log1p (log1p(tf), as PECOS);
    # rows are L2-normalized either way
    # bow over raw text: the vocabulary is the vocab_size most frequent terms (by document frequency); more
    # keeps rarer, more specific terms at F = vocab_size input features (embedding rows, or classifier inputs
    # with dim 0) and a longer vocabulary in the checkpoint
    vocab_size: int = 50_000
    min_df: int = 2  # bow over raw text: drop terms in fewer training documents (typos, numbers, one-off
    # phrases); higher leaves fewer, more general terms before the cap
    ngrams: int = 1  # bow over raw text: longest word n-gram in the vocabulary; 2 adds bigrams ("member
    # states"), which carry phrases single words miss, at a longer count (EURLEX57K's 51,000 documents: ~5
    # minutes on a loaded 2-core CPU, each run) and every distinct bigram held in memory while the
    # vocabulary is chosen (once: it is cached)
    freeze: bool = False  # train only the classifier (the fixed-feature setting)


@dataclass
class SETOptions:
    """The rewiring schedule of a fixed fan-in layer (``classifier.set``; :class:`xmc.sparse.dst.SET`).
    Defaults follow the SPARTEX settings for large label sets."""

    enabled: bool = True  # rewire the fixed fan-in classifier during training
    interval: int = 800  # optimizer steps between rewirings; shorter = more exploration, more noise
    end: float = 0.66  # stop rewiring after this fraction of the steps, so the final ids settle
    prune: str = "fraction"  # fraction (the same count every row) or threshold (|w| below a bound)
    fraction: float = 0.25  # share of each row pruned per rewiring (prune=fraction)
    threshold: float = 0.01  # magnitude bound (prune=threshold)
    floor: float = 1e-4  # the pruning knob decays on a cosine to this value at `end`
    regrow: str = "random"  # random (SET) or gradient (RigL: largest |dense gradient| of a batch, per row)
    # regrow=gradient: the dense gradient is summed over the last N batches before each rewiring, recomputed
    # at the current weights (their inputs are kept, sparse when mostly zero). One 64-document batch shows
    # most labels no positive; over fixed inputs (bow with dim 0) N batches rank columns by N times the data
    grad_batches: int = 1
    gamma: float = 0.0  # SRigL neuron ablation in a sparse intermediate layer (needs regrow=gradient):
    # a neuron with fewer than gamma * K salient connections is removed; 0 = never (SRigL uses 0.3)


@dataclass
class MetaConfig:
    enabled: bool = False  # auxiliary meta-classifier over label clusters (improves gradient flow)
    # label clusters; 0 = xmc.classifiers.meta.cluster_count(L): L / 64 rounded to a power of two, the one
    # rule every shipped config follows (SPARTEX's 2,048 for 131K labels)
    clusters: int = 0
    lam0: float = 0.4  # initial weight of the meta loss: (1 - lam) * main + lam * meta
    cutoff_epoch: int = 5  # lam decays on a cosine to 0 at this epoch, then the meta loss is off


@dataclass
class RPSOptions:
    method: str = "stable"  # hashednet (per weight), roast (per tile) or stable (STABLE-RPS)
    compression: float = 8.0  # L x D weights over m shared slots; used when bytes is 0
    bytes: int = 0  # size of the shared array in bytes (m = bytes / 4), independent of L and D
    init_scale: float = 0.0  # initial std of the weights; 0 = 1 / sqrt(D), as a dense layer
    array_std: float = 0.0  # initial std of the shared array (0 = init_scale); weights = (init_scale /
    # array_std) * slot, so under AdamW a smaller array_std is a proportionally larger step in weight space
    sign: bool = True  # a random sign per weight decorrelates weights that share a slot
    stable_grad: bool | None = None  # divide slot gradients by the scale^2 (None: on for stable only)


@dataclass
class ClassifierConfig:
    type: str = "fixed_fanin"  # dense, fixed_fanin or rps
    fan_in: int = 32  # fixed fan-in K; memory ~ L * K, accuracy drops when K is far below D
    fan_in_group: int = 1  # G > 1: labels in groups of G share one id row (HASTE): G times fewer id bytes
    # and tensor-core products on GPUs, at less freedom per label; 16 suits a GPU, 1 is the plain layer
    intermediate: int = 0  # width of a layer between encoder and classifier (0 = none; SPARTEX: 4096)
    intermediate_fan_in: int = 0  # > 0: the intermediate layer is fixed fan-in too, rewired like the
    # classifier (with SRigL neuron ablation when set.gamma > 0); 0 = a dense intermediate layer
    # N > 0 (fixed_fanin only): the N most frequent training labels get a dense head, the rest the fixed
    # fan-in tail (HASTE): the head's dense gradient teaches the encoder, the tail keeps memory ~ (L - N) K
    dense_head: int = 0
    # How the dense head learns: sgd (with the tail, and teaching the encoder), or svm: before training,
    # one squared-hinge linear SVM per head label solved to convergence (liblinear) over the fixed inputs
    # (bow with dim 0, or features), then frozen; the tail trains as usual. head_c is the SVMs' C.
    head_fit: str = "sgd"
    head_c: float = 1.0
    # svm: worker processes fitting the head (0 = torch's thread count); each holds its own liblinear copy
    # of the training inputs (0.6-1.0 GB resident at 40,500 documents x 200,000 terms), so cap it on big hosts
    head_jobs: int = 0
    # id, or semantic: the fixed fan-in labels placed so that each group of fan_in_group holds labels that
    # share documents (balanced clustering), not labels with consecutive ids; ids outside stay label ids
    label_order: str = "id"
    bias: bool = True
    bias_init: str = "uniform"  # uniform (nn.Linear's +-1/sqrt(fan-in)) or prior: each label's training
    # log-odds, so BCE starts at the label frequencies instead of first pushing every logit down
    ids: str = "random"  # fixed fan-in's initial ids: random, or centroid (each label's K strongest input
    # coordinates in its training documents' summed inputs; needs fixed inputs: bow with dim 0, or features)
    # ids=centroid: what takes the slots of a label whose documents have fewer than K distinct inputs:
    # random ids, frequent (the inputs of largest total magnitude over the training documents), or
    # related (first the heaviest inputs its most co-occurring labels' documents hold and its own lack)
    centroid_fill: str = "random"
    set: SETOptions = field(default_factory=SETOptions)
    meta: MetaConfig = field(default_factory=MetaConfig)
    rps: RPSOptions = field(default_factory=RPSOptions)


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    batch_size: int = 64  # documents per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    loss: str = "squared_hinge"  # squared_hinge or bce
    encoder_lr: float = 1e-3  # transformers want 1e-5..5e-5; the bow encoder learns faster
    # The same at any label count L (docs/training.md): AdamW's update ignores the gradient's scale, and SGD's
    # is per label (scaled by L inside the optimizer, as if the loss summed over labels)
    classifier_lr: float = 1e-2
    classifier_optimizer: str = "adamw"  # adamw or sgd (momentum 0.9)
    # fp32, or bf16: the classifier's weights and AdamW moments in bf16 with stochastic rounding and no fp32
    # copy (xmc.optim): half the classifier's state bytes, for dense and fixed fan-in classifiers
    classifier_state: str = "fp32"
    # The classifier's gradients computed with its loss in one pass (on CUDA, fixed fan-in: one fused kernel
    # for logits, loss and gradients); false recomputes each label chunk's logits in backward
    fused_loss: bool = True
    encoder_weight_decay: float = 0.01
    classifier_weight_decay: float = 1e-4
    warmup: float = 0.05  # warmup as a fraction of the total steps, then cosine decay
    clip_grad_norm: float = 1.0  # on the gradient of the mean over B x L pairs, a spike guard; 0 disables it
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32), no, bf16 or fp16
    eval_every: int = 1  # epochs between dev evaluations
    # The dev metric that keeps the best model (best.safetensors) and that patience watches: P@k, nDCG@k,
    # R@k or RP@k for k = 1, 3, 5
    select: str = "P@1"
    patience: int = 0  # stop after this many evaluations without the select metric improving (0 = never)
    eval_batch_size: int = 256
    save_every: int = 0  # also checkpoint every this many optimizer steps (0 = only at evaluations)
    device: str = "auto"  # auto (CUDA when present), cpu or cuda
    # Under torchrun / accelerate launch (N processes): data (the model replicated, each micro-batch split
    # across ranks; fastest while the classifier fits one GPU) or labels (the classifier split into
    # label ranges: its memory per GPU falls as 1 / N, at an all-gather of the batch per step).
    # batch_size is the global micro-batch either way; ignored in a single process.
    parallel: str = "data"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0


CHOICES = {
    "data.format": ("auto", "bow", "split", "lf-json", "text", "features"),
    "data.propensity": ("wikipedia", "amazon", "other"),
    "encoder.type": ("bow", "transformer", "features"),
    "encoder.pooling": ("cls", "mean"),
    "encoder.activation": ("none", "relu", "gelu", "tanh"),
    "encoder.weighting": ("tfidf", "log1p"),
    "classifier.type": ("dense", "fixed_fanin", "rps"),
    "classifier.ids": ("random", "centroid"),
    "classifier.centroid_fill": ("random", "frequent", "related"),
    "classifier.label_order": ("id", "semantic"),
    "classifier.head_fit": ("sgd", "svm"),
    "classifier.bias_init": ("uniform", "prior"),
    "classifier.set.prune": ("fraction", "threshold"),
    "classifier.set.regrow": ("random", "gradient"),
    "classifier.rps.method": ("hashednet", "roast", "stable"),
    "train.loss": ("squared_hinge", "bce"),
    "train.classifier_optimizer": ("adamw", "sgd"),
    "train.classifier_state": ("fp32", "bf16"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.parallel": ("data", "labels"),
    "train.select": tuple(f"{m}@{k}" for m in ("P", "nDCG", "R", "RP") for k in (1, 3, 5)),
}
PATH_KEYS = ("data.train", "data.dev", "data.test", "data.labels", "data.exclude_test")

# Allowed values of numeric keys: (lowest, highest), each None for no bound, both included; a key in
# OPEN_ABOVE excludes its highest value. Without them a zero batch divides by zero and a negative epoch
# count "trains" an untrained model that reports metrics.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.dev_fraction": (0, 1),
    "encoder.max_length": (1, None),
    "encoder.dropout": (0, 1),
    "encoder.dim": (0, None),
    "encoder.vocab_size": (1, None),
    "encoder.min_df": (1, None),
    "encoder.ngrams": (1, 3),
    "classifier.fan_in": (1, None),
    "classifier.fan_in_group": (1, None),
    "classifier.dense_head": (0, None),
    "classifier.head_c": (0, None),
    "classifier.head_jobs": (0, None),
    "classifier.intermediate": (0, None),
    "classifier.intermediate_fan_in": (0, None),
    "classifier.set.interval": (1, None),
    "classifier.set.grad_batches": (1, None),
    "classifier.set.end": (0, 1),
    "classifier.set.fraction": (0, 1),
    "classifier.set.threshold": (0, None),
    "classifier.set.floor": (0, None),
    "classifier.set.gamma": (0, 1),
    "classifier.meta.clusters": (0, None),
    "classifier.meta.lam0": (0, 1),
    "classifier.meta.cutoff_epoch": (0, None),
    "classifier.rps.compression": (1, None),
    "classifier.rps.bytes": (0, None),
    "classifier.rps.init_scale": (0, None),
    "classifier.rps.array_std": (0, None),
    "train.epochs": (1, None),
    "train.max_steps": (0, None),
    "train.batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.encoder_lr": (0, None),
    "train.classifier_lr": (0, None),
    "train.encoder_weight_decay": (0, None),
    "train.classifier_weight_decay": (0, None),
    "train.warmup": (0, 1),
    "train.clip_grad_norm": (0, None),
    "train.eval_every": (1, None),
    "train.patience": (0, None),
    "train.eval_batch_size": (1, None),
    "train.save_every": (0, None),
    "seed": (0, None),
}
OPEN_ABOVE = {"data.dev_fraction", "encoder.dropout"}


def default_config_path() -> Path:
    """``configs/default.yaml`` of the source tree this package was installed from."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides and validate.

    Relative data paths in the file are resolved against the file's folder when they exist there
    (so shipped configs work from any directory); paths given as overrides are taken as typed.
    """
    path = Path(path) if path is not None else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    if not path.is_file():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    _resolve_paths(raw, path.parent)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it"
            ) from None
        _set_dotted(raw, key.strip(), parsed)
    return build(Config, raw, "")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a YAML error: what is wrong and where (1-based line and column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def save_config(config: Config, path: str | os.PathLike) -> None:
    from xmc.data.atomic import atomic_open

    with atomic_open(path) as handle:
        handle.write(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False).encode())


def _resolve_paths(raw: dict, base: Path) -> None:
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = (raw.get(section) or {}).get(name)
        if isinstance(value, str) and value:
            parts = [
                p if os.path.isabs(p) or not (base / p).exists() else str(base / p) for p in value.split(",")
            ]
            raw[section][name] = ",".join(parts)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a nested mapping, checking keys, types and choices."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else f"; known keys: {', '.join(sorted(names))}"
            )
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        dotted = prefix + f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = build(kind, raw[f.name], dotted + ".")
        else:
            values[f.name] = _coerce(dotted, raw[f.name], kind)
    obj = cls(**values)
    check_options(obj, prefix)
    return obj


def check_options(obj: Any, prefix: str) -> None:
    """Raise :class:`ConfigError` unless the fields of the dataclass ``obj`` (the section ``prefix``,
    e.g. ``"classifier.set."``) are among their :data:`CHOICES` and inside their :data:`RANGES`. Loading
    a config checks every section; code handed a section directly (e.g. :class:`xmc.sparse.dst.SET`)
    checks it the same way."""
    for f in dataclasses.fields(obj):
        dotted = prefix + f.name
        value = getattr(obj, f.name)
        if dotted in CHOICES and value not in CHOICES[dotted]:
            raise ConfigError(f"{dotted} must be one of {', '.join(CHOICES[dotted])}, got {value!r}")
        if dotted in RANGES:
            _check_range(dotted, value)


def _check_range(key: str, value: float) -> None:
    low, high = RANGES[key]
    open_above = key in OPEN_ABOVE
    inside = (
        math.isfinite(value)
        and (low is None or value >= low)
        and (high is None or (value < high if open_above else value <= high))
    )
    if not inside:
        if high is None:
            allowed = f"at least {low}"
        else:
            allowed = f"in [{low}, {high}{')' if open_above else ']'}"
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


_NUMBER = re.compile(r"[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(key: str, text: str, kind: type) -> Any:
    """A number YAML 1.1 reads as a string (``3e-2``, ``1e6``: no dot in the mantissa or no sign in the
    exponent) as the number it means; ``1e6`` is an integer for an integer key. Other text is left
    for the type check to reject."""
    if not _NUMBER.fullmatch(text.strip()):
        return text
    number = float(text.replace("_", ""))
    if kind is int:
        if not number.is_integer():
            raise ConfigError(f"{key} must be int, got {text!r}")
        return int(number)
    return number


def _coerce(key: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(k for k in options if k is not type(None))
        origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, typing.get_args(kind)[0]) for v in value]
    if kind in (int, float) and isinstance(value, str):
        value = _number(key, value, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, bool):
        # YAML 1.1 reads no / yes (off / on) as booleans: `train.precision=no` means the choice "no".
        word = "yes" if value else "no"
        if word in CHOICES.get(key, ()):
            return word
        raise ConfigError(
            f"{key} must be a string, got {value!r}: quote it, e.g. {key}='{str(value).lower()}'"
        )
    if kind is str and isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")
    return value

"""Memory planner: where the memory of a training step goes, and which GPUs it fits, without building it.

A :class:`Plan` describes a training setup by its shapes alone (encoder, labels L, classifier input
width D, fan-in K, batch, sequence length, precision, optimizer, world size). :func:`estimate`
returns the bytes of every component for each classifier backend; the classifier's share comes from
the backends' own ``Classifier.state_bytes`` (a classmethod over the shape), the rest from the
formulas below. Nothing is allocated, so a plan for 2.8M labels answers in milliseconds.
:func:`measure` runs real training steps of the same shape (random-init encoder, synthetic data) and
reports the peak memory it took, to check the estimate on the machine at hand
(:mod:`xmc.memory.measure`); :func:`xmc.memory.plot.plot` draws the chart.

What is counted, per rank (the training loop keeps fp32 parameters and autocasts activations):

- encoder parameters, gradients and optimizer state: ``4 P``, ``4 P`` and ``8 P`` bytes (AdamW) for
  P parameters; a transformer's P is computed from its configuration (the pooler is dropped, as
  ``TransformerEncoder`` does; encoder shapes and presets live in :mod:`xmc.memory.encoders`);
- encoder activations kept for backward. Per layer and token, with ``e`` the activation size (2 under
  bf16/fp16 autocast, 4 in fp32), ``f = 4`` for the fp32 tensors layer norms keep under autocast,
  H the width and I the feed-forward width: ``H (3 f + 5 e + 2) + 2 e I`` -- the layer input, Q, K,
  V, the attention context, two layer-norm inputs, the feed-forward input, its two I-wide tensors and
  two dropout masks (1 byte each). Attention adds the log-sum-exp of fused attention on CUDA
  (``4 heads T`` per sequence) or the T x T probabilities and their dropout mask of the math path
  on CPU (``(e + 1) heads T^2``). The embeddings keep ``H (2 f + 1)`` per token. Gradient
  checkpointing keeps only each layer's input (``f H``) plus one layer's activations. This is an
  approximation (kernels differ by version); ``--measure`` shows the real figure;
- the intermediate layer and the meta head: parameters, gradients and optimizer state as above;
- the classifier: ``state_bytes`` of the backend (weights, ids, gradients, optimizer state, the
  chunked loss's buffers); on CPU also the buffers of the PyTorch twins that stand in for the kernels.
  Under label sharding (``parallel="labels"``) each rank holds ``ceil(L / world)`` labels and scores
  the all-gathered batch of ``world x batch`` documents; the encoder, the head and RPS's shared array
  are replicated. Data parallel (``parallel="data"``) replicates everything: a rank is a single GPU
  at its share of the batch. ``xmc train``'s ``train.batch_size`` is the global micro-batch, so a
  plan from a config at ``world_size`` N has ``batch = ceil(batch_size / N)`` per rank.

Optimizers run fused (one pass per tensor, no temporaries; see ``xmc.train.loop.build_optimizers``).
A card of G GiB fits when the total is at most ``G GiB - CUDA_RESERVE`` (the CUDA context, cuBLAS
workspaces and allocator slack of a PyTorch process, about 0.5-1 GiB).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

from xmc.memory.encoders import ENCODERS, EncoderSpec, encoder_spec

CARDS_GIB = (8, 12, 16, 24, 40, 48, 80)
CUDA_RESERVE = int(0.75 * 2**30)
_LN = 4  # bytes per element of the fp32 tensors layer norms keep under autocast


@dataclass(frozen=True)
class Plan:
    """A training setup by its shapes. ``batch`` is per rank; ``hidden`` is the encoder's output
    width (the classifier's input unless ``intermediate`` adds a layer)."""

    labels: int
    encoder: EncoderSpec = field(default_factory=lambda: ENCODERS["bert-base"])
    fan_in: int = 128
    fan_in_group: int = 1  # G > 1: grouped fan-in, one id row per G labels
    dense_head: int = (
        0  # N > 0: the fixed fan-in row holds a dense head over N labels and the tail over L - N
    )
    head_trained: bool = True  # False: a frozen SVM head (classifier.head_fit=svm), weights only
    batch: int = 64
    seq_len: int = 128
    precision: str = "bf16"  # fp32, bf16 or fp16 (autocast over fp32 parameters)
    optimizer: str = "adamw"  # classifier optimizer: adamw or sgd (the encoder always uses AdamW)
    classifier_state: str = "fp32"  # fp32, or bf16 weights and AdamW moments (train.classifier_state)
    world_size: int = 1
    parallel: str = "labels"  # over world_size GPUs: labels (classifier split) or data (all replicated)
    intermediate: int = 0
    intermediate_fan_in: int = 0  # > 0: the intermediate layer is fixed fan-in (ids counted too)
    meta_clusters: int = 0
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    freeze_encoder: bool = False
    device: str = "cuda"  # cuda or cpu: decides the attention path counted
    rps_compression: float = 8.0
    name: str = ""

    @property
    def width(self) -> int:
        """D, the classifier's input width."""
        return self.intermediate or self.encoder.hidden

    @property
    def labels_per_rank(self) -> int:
        return math.ceil(self.labels / self.world_size) if self.parallel == "labels" else self.labels

    def check(self) -> None:
        if self.labels < 1:
            raise ValueError(f"--labels must be positive, got {self.labels}")
        for key in ("batch", "seq_len", "world_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.classifier_state not in ("fp32", "bf16"):
            raise ValueError(f"--classifier-state must be fp32 or bf16, got {self.classifier_state!r}")
        if self.classifier_state == "bf16" and self.optimizer != "adamw":
            raise ValueError("--classifier-state bf16 keeps AdamW moments in bf16: use --optimizer adamw")
        if self.parallel not in ("labels", "data"):
            raise ValueError(f"--parallel must be labels or data, got {self.parallel!r}")
        if self.fan_in_group < 1:
            raise ValueError(f"--fan-in-group must be at least 1, got {self.fan_in_group}")
        if not 0 <= self.dense_head <= self.labels:
            raise ValueError(
                f"--dense-head must lie in 0..{self.labels} (the label count), got {self.dense_head}"
            )
        if self.dense_head and self.parallel == "labels" and self.world_size > 1:
            raise ValueError("a dense head (--dense-head) is not label-sharded yet: use --parallel data")
        if not 1 <= self.fan_in <= self.width:
            raise ValueError(
                f"--fan-in {self.fan_in} must lie in 1..{self.width} (the classifier's input width)"
            )


def backends() -> dict[str, type]:
    """Classifier classes by ``classifier.type``."""
    from xmc.classifiers import DenseClassifier, FixedFanInClassifier, RPSClassifier

    return {"dense": DenseClassifier, "fixed_fanin": FixedFanInClassifier, "rps": RPSClassifier}


def _activation_bytes(plan: Plan) -> int:
    spec = plan.encoder
    if spec.kind != "transformer":
        return 4 * plan.batch * spec.hidden * 2  # the (B, D) output and its dropout copy
    if plan.freeze_encoder:
        return 0
    e = 4 if plan.precision == "fp32" else 2
    tokens = plan.batch * plan.seq_len
    h, i = spec.hidden, spec.intermediate
    if plan.device == "cuda":
        attention = 4 * spec.heads * plan.seq_len * plan.batch
    else:
        attention = (e + 1) * spec.heads * plan.seq_len**2 * plan.batch
    layer = tokens * (h * (3 * _LN + 5 * e + 2) + 2 * e * i) + attention
    embeddings = tokens * h * (2 * _LN + 1)
    if plan.gradient_checkpointing:
        return embeddings + spec.layers * tokens * h * _LN + layer
    return embeddings + spec.layers * layer


def _trainable(params: int, optimizer: str) -> dict[str, int]:
    from xmc.memory.bytes import optimizer_state_bytes

    return {
        "parameters": 4 * params,
        "gradients": 4 * params,
        "optimizer": optimizer_state_bytes(params, optimizer),
    }


def estimate(plan: Plan, names: tuple[str, ...] | None = None) -> dict[str, dict[str, int]]:
    """``{backend: {component: bytes}}`` per rank for each classifier backend (all known ones by
    default). Components are prefixed ``encoder``, ``head`` (intermediate layer and meta head) and
    ``classifier``."""
    plan.check()
    available = backends()
    names = tuple(available) if names is None else names
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown classifier backend(s) {unknown}: choose from {', '.join(available)}")
    encoder = _trainable(plan.encoder.num_parameters(), "adamw")
    if plan.freeze_encoder:
        encoder.update(gradients=0, optimizer=0)
    common = {f"encoder {k}": v for k, v in encoder.items()}
    common["encoder activations"] = _activation_bytes(plan)
    head_params = head_ids = 0
    if plan.intermediate:
        fan_in = plan.intermediate_fan_in or plan.encoder.hidden
        head_params += fan_in * plan.intermediate + plan.intermediate
        if plan.intermediate_fan_in:  # int16 ids up to 32,767 inputs (xmc.nn.fixed_fanin.index_dtype)
            head_ids = plan.intermediate * fan_in * (2 if plan.encoder.hidden <= 32767 else 4)
    if plan.meta_clusters:
        head_params += plan.meta_clusters * (plan.width + 1)
    common.update({f"head {k}": v for k, v in _trainable(head_params, plan.optimizer).items()})
    if head_ids:
        common["head ids"] = head_ids
    # Label sharding: the classifier scores the all-gathered batch.
    rows = plan.batch * plan.world_size if plan.parallel == "labels" else plan.batch
    out = {}
    for name in names:
        options = {}
        if name == "fixed_fanin":
            options["fan_in"] = plan.fan_in
            if plan.fan_in_group > 1:
                options["group"] = plan.fan_in_group
            if plan.dense_head:
                options["head"] = plan.dense_head
                if not plan.head_trained:
                    options["head_trained"] = False
        elif name == "rps":  # every rank holds the whole array: its size follows the total L
            options["size"] = math.ceil(plan.labels * plan.width / plan.rps_compression)
        optimizer = plan.optimizer
        if plan.classifier_state == "bf16" and name != "rps":  # bf16 weights, gradients and moments
            options["param_bytes"], optimizer = 2, "adamw-bf16"
        backend = available[name]
        if options.get("head"):
            from xmc.classifiers.head_tail import HeadTailClassifier

            backend = HeadTailClassifier
        parts = backend.state_bytes(
            plan.width,
            plan.labels_per_rank,
            batch_size=rows,
            optimizer=optimizer,
            **options,
        )
        if plan.grad_accum > 1:  # a micro-batch's fresh gradient meets the accumulated one
            parts["accumulation"] = parts["gradients"]
        if plan.device == "cpu":
            parts["cpu_reference"] = _cpu_reference_bytes(name, plan, options)
        out[name] = {**common, **{f"classifier {k}": int(v) for k, v in parts.items()}}
    return out


def _cpu_reference_bytes(name: str, plan: Plan, options: dict) -> int:
    """Buffers of the PyTorch twins that serve CPU training in place of the Triton kernels (none on GPUs).

    Fixed fan-in: a label block's CSR matrix (int64 column ids and fp32 values for up to
    ``REFERENCE_CHUNK_ELEMENTS`` slots) and the weight gradient's dense (block, D) product and its
    gathered copy; grouped (G > 1): a range of groups' gathered inputs, per-slot products and logits, each
    at most ``REFERENCE_CHUNK_ELEMENTS`` fp32 values. RPS: the slot-table cache (int32 per weight, kept up
    to 2**28 weights), the array's signed copy (2 m values) and a block's gathered weight and its scaled
    copy."""
    labels, width = plan.labels_per_rank, plan.width
    if name == "fixed_fanin":
        from xmc.kernels.fixed_fanin_reference import REFERENCE_CHUNK_ELEMENTS

        k = options["fan_in"]
        group = options.get("group", 1)
        if group > 1:
            return (
                4 * 4 * min(REFERENCE_CHUNK_ELEMENTS, math.ceil(labels / group) * max(k, group) * plan.batch)
            )
        block = max(1, REFERENCE_CHUNK_ELEMENTS // max(k, width))
        return min(labels * k, REFERENCE_CHUNK_ELEMENTS) * 12 + 2 * min(labels, block) * width * 4
    if name == "rps":
        from xmc.classifiers.rps import CACHE_MAX_ELEMENTS
        from xmc.kernels.rps_reference import REFERENCE_CHUNK_ELEMENTS

        weights = labels * width
        table = 4 * weights if weights <= CACHE_MAX_ELEMENTS else 0
        return table + 8 * options["size"] + 2 * 4 * min(weights, REFERENCE_CHUNK_ELEMENTS)
    return 0


def fits(total: int) -> dict[int, int]:
    """Headroom in bytes (negative: does not fit) on each card of ``CARDS_GIB``."""
    return {card: card * 2**30 - CUDA_RESERVE - total for card in CARDS_GIB}


def report(plan: Plan, names: tuple[str, ...] | None = None) -> dict:
    """The JSON form: the plan, and per backend its components, total and headroom per card."""
    parts = estimate(plan, names)
    encoder = asdict(plan.encoder)
    encoder["parameters"] = plan.encoder.num_parameters()
    return {
        "plan": {
            **asdict(plan),
            "encoder": encoder,
            "width": plan.width,
            "labels_per_rank": plan.labels_per_rank,
        },
        "cuda_reserve_bytes": CUDA_RESERVE,
        "backends": {
            name: {
                "components": comp,
                "total": sum(comp.values()),
                "headroom": {f"{card}GB": room for card, room in fits(sum(comp.values())).items()},
            }
            for name, comp in parts.items()
        },
    }


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with three significant figures."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if abs(value) < 1000 else f"{value:.0f} {unit}"  # never 1.02e+03
    return f"{n:.0f} B"


def format_report(data: dict) -> str:
    """A terminal table: components in rows, backends in columns, then the cards each fits."""
    plan, by = data["plan"], data["backends"]
    names = list(by)
    enc = plan["encoder"]
    lines = [
        f"{plan['name'] + ': ' if plan['name'] else ''}L = {plan['labels']:,} labels"
        + (
            (
                f" ({plan['labels_per_rank']:,} per rank of {plan['world_size']})"
                if plan.get("parallel", "labels") == "labels"
                else f" (data parallel over {plan['world_size']})"
            )
            if plan["world_size"] > 1
            else ""
        )
        + f", D = {plan['width']}, K = {plan['fan_in']}"
        + (f", groups of {plan['fan_in_group']}" if plan.get("fan_in_group", 1) > 1 else "")
        + (f", dense head of {plan['dense_head']:,}" if plan.get("dense_head", 0) else "")
        + f", batch {plan['batch']}"
        + (f" x {plan['grad_accum']} accumulated" if plan["grad_accum"] > 1 else "")
        + f", {plan['precision']}, {plan['optimizer']}",
        f"encoder {enc['name']} ({enc['kind']}, {enc['parameters'] / 1e6:.1f}M parameters"
        + (f", sequence length {plan['seq_len']}" if enc["kind"] == "transformer" else "")
        + ")",
        "",
    ]
    components = [
        c
        for c in dict.fromkeys(c for name in names for c in by[name]["components"])
        if any(by[n]["components"].get(c) for n in names)  # rows that are zero everywhere are left out
    ]
    width = max(len(c) for c in components + ["total"]) + 2
    col = max(17, *(len(n) + 2 for n in names))  # "yes +1020 MiB" and a space before it
    lines.append(" " * width + "".join(f"{n:>{col}}" for n in names))
    for comp in components:
        cells = []
        for n in names:
            value = by[n]["components"].get(comp)
            cells.append(f"{'-' if value is None else human(value):>{col}}")
        lines.append(f"{comp.replace('_', ' '):<{width}}" + "".join(cells))
    lines.append(f"{'total':<{width}}" + "".join(f"{human(by[n]['total']):>{col}}" for n in names))
    lines += ["", f"fits a card with {human(CUDA_RESERVE)} kept for the CUDA context (headroom):"]
    for card in CARDS_GIB:
        cells = []
        for n in names:
            room = by[n]["headroom"][f"{card}GB"]
            cells.append(f"{('yes +' if room >= 0 else 'no -') + human(abs(room)):>{col}}")
        lines.append(f"{f'{card} GB':<{width}}" + "".join(cells))
    return "\n".join(lines)


# The repository's large sets: their published label counts and the shipped configs' settings.
PRESETS = {
    "wiki-500k": ("configs/repository/wiki-500k.yaml", 501_008),  # the raw-text release
    "amazon-670k": ("configs/repository/amazon-670k.yaml", 670_091),
    "amazon-3m": ("configs/repository/amazon-3m.yaml", 2_812_281),
    "lf-amazontitles-1.3m": ("configs/repository/lf-amazontitles-1.3m.yaml", 1_305_265),
}


def preset_plan(name: str, **changes) -> Plan:
    """The plan of a repository preset: its real L and the anchors' settings from its shipped config."""
    from xmc.config import default_config_path, load_config

    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    relative, labels = PRESETS[key]
    config = load_config(default_config_path().parents[1] / relative)
    return replace(plan_from_config(config, labels), name=key, **changes)


def plan_from_config(config, labels: int | None = None, features: int | None = None) -> Plan:
    """A plan from a training :class:`~xmc.config.Config`. ``labels`` (and for bag-of-words,
    ``features``) default to what the config's files say, read from headers only."""
    enc = config.encoder
    if labels is None or (enc.type == "bow" and features is None):
        found_labels, found_features = counts_from_data(config)
        labels = labels if labels is not None else found_labels
        features = features if features is not None else found_features
    if labels is None:
        raise ValueError(
            "cannot tell the number of labels from the config's data files: point data.train at the training "
            "file (an override after the config) or pass --labels"
        )
    if enc.type == "transformer":
        spec = encoder_spec(enc.name_or_path)
    elif enc.type == "bow":
        if not features:
            raise ValueError(
                "cannot tell the bag-of-words feature count from the data: point data.train at the training "
                "file or pass --encoder bow:F"
            )
        # dim 0: the TF-IDF vector itself is the classifier's input (F wide, no parameters)
        spec = EncoderSpec(
            f"bow:{features}",
            kind="bow",
            hidden=enc.dim or features,
            features=features,
            layers=0,
            params=None if enc.dim else 0,
        )
    else:
        spec = EncoderSpec("features", kind="features", hidden=enc.dim, layers=0)
    precision = {"no": "fp32", "auto": "bf16"}.get(config.train.precision, config.train.precision)
    width = config.classifier.intermediate or spec.hidden
    rps = config.classifier.rps
    compression = labels * width * 4 / rps.bytes if rps.bytes else rps.compression
    return Plan(
        labels=labels,
        encoder=spec,
        fan_in=config.classifier.fan_in,
        fan_in_group=config.classifier.fan_in_group,
        dense_head=config.classifier.dense_head if config.classifier.type == "fixed_fanin" else 0,
        head_trained=config.classifier.head_fit == "sgd",
        batch=config.train.batch_size,
        seq_len=enc.max_length,
        precision=precision,
        optimizer=config.train.classifier_optimizer,
        classifier_state=config.train.classifier_state,
        intermediate=config.classifier.intermediate,
        intermediate_fan_in=config.classifier.intermediate_fan_in if config.classifier.intermediate else 0,
        meta_clusters=_meta_clusters(config, labels),
        grad_accum=config.train.grad_accum,
        gradient_checkpointing=enc.gradient_checkpointing,
        freeze_encoder=enc.freeze,
        rps_compression=compression,
    )


def _meta_clusters(config, labels: int) -> int:
    meta = config.classifier.meta
    if not meta.enabled:
        return 0
    from xmc.classifiers.meta import cluster_count

    return meta.clusters or cluster_count(labels)


def counts_from_data(config) -> tuple[int | None, int | None]:
    """(L, F) from a bag-of-words header (``N F L``) or a label file's line count; None where unknown."""
    train = (config.data.train or "").split(",")[0]
    if config.data.labels and os.path.isfile(config.data.labels):
        from xmc.data.text import decode_lines

        return len(decode_lines(config.data.labels)), None
    if train and os.path.isfile(train):
        from xmc.data.formats import detect_format

        if detect_format(train) == "bow":
            import gzip

            opener = gzip.open if train.endswith(".gz") else open
            with opener(train, "rt", encoding="utf-8") as handle:
                fields = handle.readline().split()
            if len(fields) == 3 and all(f.isdigit() for f in fields):
                return int(fields[2]), int(fields[1])
    return None, None

"""FiPS: a transformer's MLP weights as one shared dense base times sparse per-layer factors.

Block l's MLP is ``y = W2_l act(W1_l x + b1_l) + b2_l`` with ``W1_l`` (I, D) and ``W2_l`` (D, I); I = 4 D
in BERT. In the D x I orientation both weights live in the same D-dimensional space: ``W1_l^T`` and
``W2_l`` are D x I. A group of g consecutive blocks stacks its 2 g matrices side by side,

    M = [W1_a^T, W2_a, W1_b^T, W2_b, ...]            (D, 2 g I)
    M ~ U_r S_r Vh_r                                  truncated SVD, rank r <= D

and shares the base ``U = U_r`` (D, r) among them; matrix j keeps the factor
``V_j = S_r Vh_r[:, j I:(j + 1) I]`` (r, I), so ``W1_l^T ~ U V_2l`` and ``W2_l ~ U V_2l+1``. Every factor
is then sparse with exactly ``round(s r I)`` zeros (sparsity s), stored as its nonzero values in row-major
order (fp32) and its pattern as a bitmask, 8 entries a byte: r I / 8 bytes, against 2 bytes a nonzero for
int16 column ids (r I bytes at s = 0.5). With r = D and s = 0 the factorization is exact. Biases stay
dense, uncompressed and are counted apart.

Parameters of a group: ``D r + sum_j nnz(V_j)`` with ``nnz = r I - round(s r I)``. A budget p is a
fraction of the original MLP weights (biases excluded): r is the largest rank <= D with
``D r + 2 g nnz(r) <= p 2 g D I``.

Forward of a compressed linear, x (T, D) or h (T, I), never forming the D x I weight:

    first linear:  y = (x U) V_j + b           (T, r), then (T, I)
    second linear: y = (h V_j^T) U^T + b       (T, r), then (T, D)

Every forward rebuilds V densely, (r, I) per layer, by scattering the values through the unpacked mask
(differentiable in the values; the pattern stays fixed), never the (D, I) weight.
``FipsLinear.sparse_products = True`` instead multiplies by V as a CSR matrix (``torch.sparse``) when no
gradient is wanted on CPU, so V never exists densely; it is off by default because on a 2-core CPU it made
MiniLM's forward 4-9x slower without lowering peak memory (``benchmarks/bench_fips_memory.py``; the (r, I)
rebuilt factor is about 2 MB per layer there).

The factors are fitted in :mod:`xmc.compress.fit`. A compressed model is saved as a Hugging Face folder whose
``config.json`` carries the structure under ``xmc_fips`` and whose ``model.safetensors`` holds every weight
but the compressed MLP weights, plus ``fips.safetensors`` (the bases, the factors' values and masks and the
MLP biases) and ``fips.json`` (the summary): no dense MLP weight is stored. :func:`load_model` builds the
model with its weights on the meta device, swaps the compressed linears in and assigns both files to it,
so no dense MLP weight is ever allocated. Folders of formats 1 and 2 (the pattern as CSR column ids and
row pointers; format 1 also stored the dense products, which are not read) still load. Plain
``transformers`` does not know the layout: ``materialize`` gives a dense model for other tools.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FIPS_KEY = "xmc_fips"  # config.json entry that marks a FiPS model and gives its structure
FIPS_FILE = "fips.safetensors"
SUMMARY_FILE = "fips.json"
# 3: the factors' patterns as bitmasks (2: as CSR ids); 2 and 3: model.safetensors without the compressed MLP
# weights (1 stored their dense products)
FORMAT_VERSION = 3


@dataclass(frozen=True)
class MLPBlock:
    """Where block ``layer``'s MLP lives: ``(parent, attribute)`` of its two linears, and its activation."""

    layer: int
    first: tuple[nn.Module, str]
    second: tuple[nn.Module, str]
    activation: Callable[[torch.Tensor], torch.Tensor]

    def linears(self) -> tuple[nn.Module, nn.Module]:
        return getattr(*self.first), getattr(*self.second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP without dropout, residual or LayerNorm: (T, D) -> (T, D)."""
        first, second = self.linears()
        return second(self.activation(first(x)))


def mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    """The MLP of every layer of a BERT-style (``encoder.layer[i].intermediate`` / ``.output``: BERT,
    RoBERTa, MiniLM, ELECTRA) or DistilBERT-style (``transformer.layer[i].ffn``) base model."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is not None and all(hasattr(x, "intermediate") and hasattr(x, "output") for x in layers):
        return [
            MLPBlock(i, (x.intermediate, "dense"), (x.output, "dense"), x.intermediate.intermediate_act_fn)
            for i, x in enumerate(layers)
        ]
    layers = getattr(getattr(model, "transformer", None), "layer", None)
    if layers is not None and all(hasattr(x, "ffn") for x in layers):
        return [MLPBlock(i, (x.ffn, "lin1"), (x.ffn, "lin2"), x.ffn.activation) for i, x in enumerate(layers)]
    raise ValueError(
        f"{type(model).__name__}: FiPS compresses BERT-style models (encoder.layer[i].intermediate/output) "
        "and DistilBERT-style models (transformer.layer[i].ffn); this architecture is neither"
    )


def make_groups(layers: int, group_size: int) -> list[list[int]]:
    """Consecutive blocks in groups of ``group_size`` (the last one may be smaller)."""
    if group_size < 1:
        raise ValueError(f"the group size must be at least 1, got {group_size}")
    return [list(range(i, min(i + group_size, layers))) for i in range(0, layers, group_size)]


def kept(numel: int, sparsity: float) -> int:
    """Nonzeros of a factor of ``numel`` entries at ``sparsity``: exactly ``numel - round(s numel)``."""
    return numel - round(sparsity * numel)


def group_parameters(hidden: int, intermediate: int, matrices: int, rank: int, sparsity: float) -> int:
    """``D r + sum_j nnz(V_j)``: a group's compressed weights (its base and its factors' nonzeros)."""
    return hidden * rank + matrices * kept(rank * intermediate, sparsity)


def rank_for_budget(hidden: int, intermediate: int, matrices: int, budget: float, sparsity: float) -> int:
    """The largest rank r <= D whose group keeps at most ``budget`` of the ``matrices`` dense D x I
    weights: ``r = floor(p 2 g D I / (D + (1 - s) 2 g I))``, lowered while rounding overshoots."""
    allowed = budget * matrices * hidden * intermediate
    rank = min(hidden, math.floor(allowed / (hidden + (1 - sparsity) * matrices * intermediate)))
    while rank > 0 and group_parameters(hidden, intermediate, matrices, rank, sparsity) > allowed:
        rank -= 1
    if rank < 1:
        smallest = group_parameters(hidden, intermediate, matrices, 1, sparsity) / (allowed / budget)
        raise ValueError(
            f"a budget of {budget:g} of the MLP weights is too small for rank 1 at sparsity {sparsity:g} "
            f"(rank 1 keeps {smallest:.3g}): raise the budget or the sparsity"
        )
    return rank


def svd_factors(matrices: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared base ``U`` (D, r) and factors ``V_j`` (r, I) with ``matrices[j] ~ U V_j``, from a truncated
    SVD of the D x (n I) concatenation (in float64; returned in float32). The singular values are folded
    into the factors, so U has orthonormal columns."""
    stacked = torch.cat([m.detach().double() for m in matrices], dim=1)  # (D, n I)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    factors = (s[:rank, None] * vh[:rank]).float()  # (r, n I)
    return u[:, :rank].float().contiguous(), [f.contiguous() for f in factors.split(matrices[0].shape[1], 1)]


def magnitude_mask(factor: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``kept(numel, sparsity)`` largest-magnitude entries of ``factor``."""
    keep = kept(factor.numel(), sparsity)
    mask = torch.zeros(factor.numel(), dtype=torch.bool, device=factor.device)
    mask[factor.detach().abs().flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(factor)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor's entries in row-major order, 8 to a byte: bit b of byte j is entry 8 j + b
    (the last byte padded with zeros). (ceil(numel / 8),) uint8."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) << shifts).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` entries :func:`pack_bits` packed, as a flat boolean tensor."""
    bits = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(1) & bits).view(-1)[:numel].ne(0)


def leading_bits(count: int, numel: int) -> torch.Tensor:
    """:func:`pack_bits` of a mask of ``numel`` entries whose first ``count`` are set, built byte by byte
    (never the mask itself: layers are built before their factors load, and should cost nothing)."""
    packed = torch.zeros(-(-numel // 8), dtype=torch.uint8)
    packed[: count // 8] = 0xFF
    if count % 8:
        packed[count // 8] = (1 << (count % 8)) - 1
    return packed


class FipsLinear(nn.Module):
    """A linear layer whose weight is ``U V`` (``first``: ``W^T = U V``; ``second``: ``W = U V``), with
    the base U shared through ``bases[group]`` and V (r, I) sparse: ``values`` (nnz,) parameter, its
    nonzeros in row-major order, and ``mask`` (ceil(r I / 8),) uint8 buffer, the pattern packed 8 entries
    a byte (:func:`pack_bits`). ``forward``: (..., in_features) -> (..., out_features).

    The bases live once on the model's root (``model.fips_bases``) so each is one parameter; a layer
    reads it through an unregistered reference.
    """

    sparse_products = False  # multiply by V as a CSR matrix without densifying it (module docstring)

    def __init__(
        self, bases: nn.ParameterList, group: int, kind: str, nnz: int, width: int, bias: bool
    ) -> None:
        super().__init__()
        if kind not in ("first", "second"):
            raise ValueError(f"kind must be first or second, got {kind!r}")
        object.__setattr__(self, "_bases", bases)  # not a submodule: saved once, on the root
        self.group, self.kind, self.width = group, kind, width
        self.rank, hidden = bases[group].shape[1], bases[group].shape[0]
        if not 0 <= nnz <= self.rank * width:
            raise ValueError(f"a ({self.rank}, {width}) factor cannot hold {nnz} nonzeros")
        self.in_features, self.out_features = (hidden, width) if kind == "first" else (width, hidden)
        # A valid placeholder pattern (the first nnz entries in row-major order) until real factors load,
        # on the bases' device and in their dtype: on the meta device (a model being loaded), no memory.
        like = {"device": bases[group].device, "dtype": bases[group].dtype}
        self.values = nn.Parameter(torch.zeros(nnz, **like))
        self.register_buffer("mask", leading_bits(nnz, self.rank * width))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **like)) if bias else None

    @property
    def base(self) -> torch.Tensor:
        return self._bases[self.group]

    def set_factor(self, factor: torch.Tensor, mask: torch.Tensor) -> None:
        """Store ``factor`` (r, I) at the nonzeros of ``mask`` (the nnz must match)."""
        if mask.shape != (self.rank, self.width):
            raise ValueError(f"mask is {tuple(mask.shape)}, the layer's factor ({self.rank}, {self.width})")
        count = int(mask.sum())
        if count != self.values.numel():
            raise ValueError(f"mask has {count} nonzeros, the layer holds {self.values.numel()}")
        with torch.no_grad():
            self.values.copy_(factor[mask])  # boolean indexing reads row-major, as the mask stores
            self.mask.copy_(pack_bits(mask.to(self.mask.device)))

    def pattern(self) -> torch.Tensor:
        """V's nonzero pattern, (r, I) boolean."""
        return unpack_bits(self.mask, self.rank * self.width).view(self.rank, self.width)

    def factor(self) -> torch.Tensor:
        """V as a dense (r, I) tensor (zeros off the pattern), differentiable in ``values``."""
        bits = unpack_bits(self.mask, self.rank * self.width)
        dense = self.values.new_zeros(self.rank * self.width).masked_scatter_(bits, self.values)
        return dense.view(self.rank, self.width)

    def weight_matrix(self) -> torch.Tensor:
        """The dense weight in ``nn.Linear`` orientation, (out_features, in_features)."""
        product = self.base @ self.factor()  # (D, I)
        return product.t() if self.kind == "first" else product

    def sparse_factor(self) -> torch.Tensor:
        """V as a ``torch.sparse_csr_tensor`` (r, I) over this layer's own values."""
        rows, cols = self.pattern().nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=self.rank)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                crow, cols.to(torch.int32), self.values, (self.rank, self.width), check_invariants=False
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Folders and checkpoints of format 1 and 2 stored the pattern as CSR (``cols``, ``crow``):
        read into the mask."""
        cols, crow = state_dict.pop(f"{prefix}cols", None), state_dict.pop(f"{prefix}crow", None)
        if cols is not None and crow is not None:
            rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff().long())
            mask = torch.zeros(self.rank, self.width, dtype=torch.bool)
            mask[rows, cols.long()] = True
            state_dict[f"{prefix}mask"] = pack_bits(mask)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sparse_path(self, x: torch.Tensor) -> bool:
        """Sparse products: switched on, no gradient wanted, CPU, x in the layer's dtype (no autocast)."""
        if not self.sparse_products:
            return False
        wants_grad = torch.is_grad_enabled() and (self.values.requires_grad or self.base.requires_grad)
        return (
            not wants_grad
            and x.device.type == "cpu"
            and x.dtype == self.values.dtype
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        base, lead, flat = self.base, x.shape[:-1], x.reshape(-1, x.shape[-1])  # (T, D) or (T, I)
        if self._sparse_path(x):
            factor = self.sparse_factor()
            if self.kind == "first":
                y = (flat @ base) @ factor  # (T, r) @ CSR (r, I)
            else:
                y = torch.sparse.mm(factor, flat.t()).t() @ base.t()  # (CSR (r, I) @ (I, T))^T @ (r, D)
            y = y if self.bias is None else y + self.bias
        else:
            inner, outer = (
                (flat @ base, self.factor()) if self.kind == "first" else (flat @ self.factor().t(), base.t())
            )
            # the bias added inside the second product, as nn.Linear does: no second (T, out) tensor
            y = inner @ outer if self.bias is None else torch.addmm(self.bias, inner, outer)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, {self.kind}, group {self.group}, "
            f"rank {self.rank}, nnz {self.values.numel()}"
        )


def attach_fips(model: nn.Module, structure: dict) -> list[tuple[FipsLinear, FipsLinear]]:
    """Replace every MLP's two linears by :class:`FipsLinear` layers of ``structure`` (the
    ``xmc_fips`` entry: ``groups``, ``ranks``, ``nnz`` per layer) holding placeholder values; returns
    the (first, second) pair per layer. Also records ``structure`` in ``model.config``."""
    blocks = mlp_blocks(model)
    first = blocks[0].linears()[0]
    if isinstance(first, FipsLinear):
        raise ValueError("this model's MLPs are already FiPS-compressed")
    hidden, width = first.in_features, first.out_features
    covered = sorted(layer for group in structure["groups"] for layer in group)
    if covered != list(range(len(blocks))):
        raise ValueError(f"FiPS groups {structure['groups']} must cover the {len(blocks)} layers once each")
    reference = first.weight
    model.fips_bases = nn.ParameterList(
        nn.Parameter(torch.zeros(hidden, r, dtype=reference.dtype, device=reference.device))
        for r in structure["ranks"]
    )
    pairs: list[tuple[FipsLinear, FipsLinear] | None] = [None] * len(blocks)
    for g, group in enumerate(structure["groups"]):
        for layer in group:
            block = blocks[layer]
            made = []
            for (parent, name), kind, nnz in zip(
                (block.first, block.second), ("first", "second"), structure["nnz"][layer], strict=True
            ):
                old = getattr(parent, name)
                new = FipsLinear(model.fips_bases, g, kind, nnz, width, old.bias is not None)
                new.to(device=reference.device, dtype=reference.dtype)
                if old.bias is not None:
                    new.bias.data.copy_(old.bias.detach())
                setattr(parent, name, new)
                made.append(new)
            pairs[layer] = (made[0], made[1])
    if hasattr(model, "config"):
        setattr(model.config, FIPS_KEY, structure)
    return pairs  # type: ignore[return-value]


def fips_keys(model: nn.Module) -> set[str]:
    """The keys of ``model``'s state dict that :func:`fips_state` holds."""
    names = {f"{name}." for name, m in model.named_modules() if isinstance(m, FipsLinear)}
    return {
        key
        for key in model.state_dict()
        if key.startswith("fips_bases.") or key[: key.rfind(".") + 1] in names
    }


def fips_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compressed tensors of ``model``'s state dict: the bases and every FipsLinear's values, mask
    and bias."""
    keys = fips_keys(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in keys}


def load_model(folder: str | os.PathLike) -> nn.Module:
    """The Hugging Face base model saved in ``folder`` by :func:`save_compressed`, its MLPs as
    :class:`FipsLinear` layers. The model is built from ``config.json`` with its parameters on the meta
    device (no memory; buffers such as position ids are built as usual), the FiPS layers are attached,
    and every parameter is then assigned from ``model.safetensors`` and ``fips.safetensors``: a dense MLP
    weight is never allocated, initialized or read."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModel.from_config(config)
    attach_fips(model, getattr(model.config, FIPS_KEY))
    compressed = _check_fips_file(folder, model)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder}: model.safetensors is missing; copy the whole folder written by xmc compress-encoder"
        )
    wanted = model.state_dict().keys() - compressed.keys()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    rest = {}
    for key, value in load_file(str(weights)).items():
        key = key[len(prefix) :] if prefix != "." and key.startswith(prefix) else key
        if key in wanted:  # format 1 also stored the MLPs' dense products: not read
            rest[key] = value
    model.load_state_dict({**rest, **compressed}, strict=False, assign=True)
    pooler = getattr(model, "pooler", None)
    if pooler is not None and any(p.is_meta for p in pooler.parameters()):
        model.pooler = None  # not saved from a run (the encoder pools itself): the model goes without one
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(
            f"{weights} lacks {len(left)} of the model's tensors ({', '.join(left[:3])}): the folder is "
            "damaged or from another model; compress the encoder again with xmc compress-encoder"
        )
    return model.eval()


def _check_fips_file(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / FIPS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: config.json marks a FiPS-compressed model but {FIPS_FILE} is missing; copy the "
            "whole folder written by xmc compress-encoder"
        )
    tensors = load_file(str(path))
    expected = fips_keys(model)
    # formats 1 and 2 stored each pattern as CSR, read into the mask by FipsLinear
    stored = {f"{k[: -len('cols')]}mask" if k.endswith((".cols", ".crow")) else k for k in tensors}
    if stored != expected:
        odd = sorted(expected.symmetric_difference(stored))[:3]
        raise ValueError(f"{path} does not match the structure in config.json (keys {odd})")
    return tensors


def materialize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each FipsLinear turned back into an ``nn.Linear`` of weight ``U V``."""
    dense = copy.deepcopy(model)
    for block in mlp_blocks(dense):
        for parent, name in (block.first, block.second):
            layer = getattr(parent, name)
            if not isinstance(layer, FipsLinear):
                continue
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.to(device=layer.values.device, dtype=layer.values.dtype)
            with torch.no_grad():
                linear.weight.copy_(layer.weight_matrix())
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            setattr(parent, name, linear)
    if hasattr(dense, "fips_bases"):
        del dense.fips_bases
    return dense


def describe(model: nn.Module) -> dict:
    """Parameters and bytes per component of a FiPS model: ``base``, ``factor_values``, ``factor_indices``
    (bytes only: not trained), ``mlp_biases``, ``rest`` (everything else, the pooler excluded: the
    encoder drops it), with ``original_mlp_weights`` and ``mlp_weight_fraction`` for reference."""
    layers = [m for m in model.modules() if isinstance(m, FipsLinear)]
    if not layers:
        raise ValueError("this model has no FiPS layers")

    def size(tensors) -> tuple[int, int]:
        tensors = list(tensors)
        return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)

    compressed = {id(p) for m in layers for p in m.parameters()} | {id(p) for p in model.fips_bases}
    parts = {
        "base": size(model.fips_bases),
        "factor_values": size(m.values for m in layers),
        "factor_indices": (0, size(m.mask for m in layers)[1]),
        "mlp_biases": size(m.bias for m in layers if m.bias is not None),
        "rest": size(
            p
            for name, p in model.named_parameters()
            if id(p) not in compressed and not name.startswith("pooler.")
        ),
    }
    original = sum(m.in_features * m.out_features for m in layers)
    weights = parts["base"][0] + parts["factor_values"][0]
    return {
        "parameters": {k: v[0] for k, v in parts.items() if k != "factor_indices"},
        "bytes": {k: v[1] for k, v in parts.items()},
        "total_parameters": sum(v[0] for v in parts.values()),
        "total_bytes": sum(v[1] for v in parts.values()),
        "original_mlp_weights": original,
        "mlp_weights": weights,
        "mlp_weight_fraction": weights / original,
    }


def save_compressed(model: nn.Module, tokenizer, folder: str | os.PathLike, summary: dict) -> dict:
    """Write ``folder``: ``config.json`` (with ``xmc_fips``) and ``model.safetensors`` holding every
    weight but the compressed ones, the tokenizer, ``fips.safetensors`` (bases, factors, MLP biases)
    and ``fips.json`` (``summary`` plus :func:`describe`). Returns what ``fips.json`` holds."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    structure = getattr(model.config, FIPS_KEY)
    compressed = fips_state(model)
    rest = {k: v for k, v in model.state_dict().items() if k not in compressed}
    model.save_pretrained(str(folder), state_dict=rest)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    save_file(compressed, str(folder / FIPS_FILE), metadata={"format": f"xmc-fips-{FORMAT_VERSION}"})
    full = {"method": "fips", "version": FORMAT_VERSION, **summary, "structure": structure, **describe(model)}
    (folder / SUMMARY_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return full


def format_summary(summary: dict) -> str:
    """Terminal lines: parameters and bytes per component, and the per-block reconstruction error."""
    from xmc.memory.planner import human

    params, sizes = summary["parameters"], summary["bytes"]
    lines = [
        f"MLP weights {summary['mlp_weights']:,} of {summary['original_mlp_weights']:,} "
        f"({100 * summary['mlp_weight_fraction']:.1f}%), ranks {summary['structure']['ranks']}, "
        f"sparsity {summary['structure']['sparsity']:g}",
        f"{'component':<16}{'parameters':>14}{'bytes':>12}",
    ]
    for name in ("base", "factor_values", "factor_indices", "mlp_biases", "rest"):
        count = f"{params[name]:,}" if name in params else "-"
        lines.append(f"{name.replace('_', ' '):<16}{count:>14}{human(sizes[name]):>12}")
    lines.append(f"{'total':<16}{summary['total_parameters']:>14,}{human(summary['total_bytes']):>12}")
    errors = summary.get("reconstruction", {}).get("relative_mse")
    if errors:
        svd = summary["reconstruction"]["relative_mse_svd"]
        lines.append("per-block relative MSE on held-out tokens (fitted / SVD + one-shot pruning):")
        pairs = enumerate(zip(errors, svd, strict=True))
        lines.append("  " + "  ".join(f"{i}: {e:.4f} / {s:.4f}" for i, (e, s) in pairs))
    return "\n".join(lines)

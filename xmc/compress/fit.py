"""Fitting FiPS factors: cache MLP activations, then minimize each group's block-wise reconstruction error.

1. :func:`cache_activations` runs the original model (eval mode, no gradients) over training documents
   and keeps, for a random sample of their non-padding tokens, every block's MLP input (the attention
   output after its LayerNorm, i.e. the input of the first linear) and the MLP's output (the second
   linear's result, before dropout, residual and LayerNorm): two (N, D) float32 tensors per block. Every
   block sees the original model's activations, so blocks are fitted independently of one another's
   errors.
2. :func:`compress_mlps` initializes each group's base and factors by SVD
   (:func:`xmc.compress.fips.svd_factors`), then runs Adam on the base, factors and biases against the group's
   loss ``mean over its blocks of ||mlp(x) - y||^2 / mean(y^2)`` on batches of cached tokens, with gradual
   magnitude pruning (Zhu and Gupta's cubic schedule ``s_t = s (1 - (1 - t / T)^3)``, T = 70% of the steps,
   every factor pruned to exactly its share) and a cosine learning rate. After T the patterns are fixed and
   exactly ``round(s r I)`` entries of each factor are zero. 10% of the cached tokens are held out to report
   each block's relative error ``||mlp(x) - y||^2 / ||y||^2``, beside the error of the SVD pruned once to s
   without optimization.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xmc.compress.fips import (
    FORMAT_VERSION,
    attach_fips,
    kept,
    magnitude_mask,
    make_groups,
    mlp_blocks,
    rank_for_budget,
    svd_factors,
)
from xmc.progress import bars

log = logging.getLogger(__name__)

PRUNE_END = 0.7  # fraction of the steps over which the factors go from dense to their sparsity
PRUNE_EVENTS = 20  # magnitude pruning rounds on the way


@dataclass
class ActivationCache:
    """Per block: ``inputs[l]`` and ``outputs[l]``, float32 (N, D), row i for the same token."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    documents: int

    @property
    def tokens(self) -> int:
        return int(self.inputs[0].shape[0])


@torch.no_grad()
def cache_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    tokens: int = 16384,
    max_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> ActivationCache:
    """Every block's MLP input and output at ``tokens`` tokens drawn uniformly (seeded, without
    replacement) from the non-padding tokens of ``texts`` tokenized to ``max_length``."""
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("no documents to cache activations from")
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    chosen = np.zeros(int(offsets[-1]), dtype=bool)
    chosen[
        np.random.default_rng([seed, 0xF195]).choice(chosen.size, min(tokens, chosen.size), replace=False)
    ] = True

    blocks = mlp_blocks(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    state: dict[str, torch.Tensor] = {}

    def keep_input(layer: int):
        return lambda module, args: inputs[layer].append(args[0][state["rows"]].float().cpu())

    def keep_output(layer: int):
        return lambda module, args, out: outputs[layer].append(out[state["rows"]].float().cpu())

    handles = []
    for block in blocks:
        first, second = block.linears()
        handles.append(first.register_forward_pre_hook(keep_input(block.layer)))
        handles.append(second.register_forward_hook(keep_output(block.layer)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        shown = bars(progress)
        for start in tqdm(range(0, len(ids), batch_size), desc="caching", unit="batch", disable=not shown):
            batch = tokenizer.pad({"input_ids": ids[start : start + batch_size]}, return_tensors="pt")
            rows = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)  # (B, T) tokens kept
            for i, doc in enumerate(range(start, min(start + batch_size, len(ids)))):
                rows[i, : lengths[doc]] = torch.from_numpy(chosen[offsets[doc] : offsets[doc + 1]])
            state["rows"] = rows.to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ActivationCache([torch.cat(x) for x in inputs], [torch.cat(y) for y in outputs], len(ids))


def _relative_error(predict, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    """``||predict(x) - y||^2 / ||y||^2`` in float64 sums, in batches of rows."""
    err = ref = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            target = y[i : i + batch].double()
            err += float((predict(x[i : i + batch]).double() - target).pow(2).sum())
            ref += float(target.pow(2).sum())
    return err / max(ref, 1e-30)


class _GroupMLP(nn.Module):
    """A group's MLPs in dense-factor form for fitting: shared ``base`` (D, r), ``factors[j]`` (r, I)
    (masked to their patterns after every step) and the biases; j = 2 i is block i's first linear."""

    def __init__(self, base, factors, biases, activations) -> None:
        super().__init__()
        self.base = nn.Parameter(base.clone())
        self.factors = nn.ParameterList(nn.Parameter(f.clone()) for f in factors)
        # A linear without a bias keeps a fixed zero one (no gradient, so Adam leaves it alone).
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(0) if b is None else b.clone(), requires_grad=b is not None)
            for b in biases
        )
        self.activations = activations

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = self.factors[2 * i], self.factors[2 * i + 1]
        b1, b2 = self.biases[2 * i], self.biases[2 * i + 1]
        h = (x @ self.base) @ v1  # (T, I)
        h = self.activations[i](h if b1.numel() == 0 else h + b1)
        y = (h @ v2.t()) @ self.base.t()  # (T, D)
        return y if b2.numel() == 0 else y + b2


def _fit_group(
    group: _GroupMLP,
    x: list[torch.Tensor],
    y: list[torch.Tensor],
    sparsity: float,
    steps: int,
    lr: float,
    batch_tokens: int,
    generator: torch.Generator,
    progress: bool,
) -> list[torch.Tensor]:
    """Adam with gradual magnitude pruning to ``sparsity``; returns the final masks (exact counts)."""
    from tqdm.auto import tqdm

    masks = [torch.ones_like(f, dtype=torch.bool) for f in group.factors]
    optimizer = torch.optim.Adam(group.parameters(), lr=lr)
    scales = [float(t.pow(2).mean()) for t in y]  # each block's loss relative to its output's energy
    end = max(1, round(PRUNE_END * steps))
    events = set(np.linspace(0, end, PRUNE_EVENTS + 1).round().astype(int).tolist())
    bar = tqdm(range(steps), desc="fitting", unit="step", disable=not bars(progress), leave=False)
    for step in bar:
        if step in events:
            target = sparsity * (1 - (1 - min(step / end, 1.0)) ** 3)
            with torch.no_grad():
                for f, m in zip(group.factors, masks, strict=True):
                    m.copy_(magnitude_mask(f * m, target))
                    f.mul_(m)
        for g in optimizer.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(0, x[0].shape[0], (batch_tokens,), generator=generator)
        loss = sum(
            (group.block(i, x[i][rows]) - y[i][rows]).pow(2).mean() / scales[i] for i in range(len(x))
        ) / len(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for f, m in zip(group.factors, masks, strict=True):
                f.mul_(m)  # pruned entries stay exactly zero whatever Adam's moments say
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    with torch.no_grad():  # at exactly the final sparsity (also when steps < the schedule's end)
        for f, m in zip(group.factors, masks, strict=True):
            m.copy_(magnitude_mask(f * m, sparsity))
            f.mul_(m)
    return masks


def plan_ranks(
    model: nn.Module, sparsity: float, budget: float | None, rank: int | None, group_size: int
) -> tuple[list[list[int]], list[int]]:
    """The groups of ``model``'s blocks and each group's rank: ``rank`` for all, or the largest that keeps
    ``budget`` of the group's MLP weights at ``sparsity``. Raises ``ValueError`` for impossible settings."""
    if (budget is None) == (rank is None):
        raise ValueError("give exactly one of budget and rank")
    if not 0 <= sparsity < 1:
        raise ValueError(f"the sparsity must lie in [0, 1), got {sparsity}")
    blocks = mlp_blocks(model)
    first = blocks[0].linears()[0]
    if not isinstance(first, nn.Linear):
        raise ValueError("this model's MLPs are already FiPS-compressed")
    hidden, width = first.in_features, first.out_features
    if rank is not None and not 1 <= rank <= hidden:
        raise ValueError(f"the rank must lie in 1..{hidden} (the hidden size), got {rank}")
    groups = make_groups(len(blocks), group_size)
    ranks = [
        rank if rank is not None else rank_for_budget(hidden, width, 2 * len(g), budget, sparsity)
        for g in groups
    ]
    return groups, ranks


def compress_mlps(
    model: nn.Module,
    cache: ActivationCache | None,
    sparsity: float,
    budget: float | None = None,
    rank: int | None = None,
    group_size: int = 2,
    steps: int = 300,
    lr: float = 1e-3,
    batch_tokens: int = 1024,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Compress ``model``'s MLPs in place (their linears become :class:`xmc.compress.fips.FipsLinear`) and
    return a report: the structure, the fit settings and per-block relative errors on held-out tokens.

    Exactly one of ``budget`` (fraction of the original MLP weights) and ``rank`` (the same rank for every
    group) sets the rank. Without a cache, or with ``steps=0``, the factors are the SVD pruned once by
    magnitude (and no error is reported without a cache).
    """
    started = time.perf_counter()
    blocks = mlp_blocks(model)
    groups, ranks = plan_ranks(model, sparsity, budget, rank, group_size)
    width = blocks[0].linears()[0].out_features
    generator = torch.Generator().manual_seed(seed)
    split = None
    if cache is not None:
        order = torch.randperm(cache.tokens, generator=generator)
        held = max(1, round(holdout * cache.tokens))
        split = (order[held:], order[:held])

    factors, biases, masks, errors, svd_errors = {}, {}, {}, [0.0] * len(blocks), [0.0] * len(blocks)
    bases = []
    for group, r in zip(groups, ranks, strict=True):
        weights, bias, activations = [], [], []
        for layer in group:
            lin1, lin2 = blocks[layer].linears()
            # both D x I (fitted on CPU, like the cache)
            weights += [lin1.weight.detach().t().cpu(), lin2.weight.detach().cpu()]
            bias += [_bias(lin1), _bias(lin2)]  # None where the linear has none
            activations.append(blocks[layer].activation)
        base, vs = svd_factors(weights, r)
        fit = _GroupMLP(base, vs, bias, activations)
        if split is not None:  # the SVD pruned once, for comparison
            once = _GroupMLP(base, [v * magnitude_mask(v, sparsity) for v in vs], bias, activations)
            for i, layer in enumerate(group):
                x, y = cache.inputs[layer][split[1]], cache.outputs[layer][split[1]]
                svd_errors[layer] = _relative_error(lambda t, i=i, m=once: m.block(i, t), x, y)
        if split is not None and steps > 0:
            x = [cache.inputs[layer][split[0]] for layer in group]
            y = [cache.outputs[layer][split[0]] for layer in group]
            group_masks = _fit_group(fit, x, y, sparsity, steps, lr, batch_tokens, generator, progress)
        else:
            group_masks = [magnitude_mask(v, sparsity) for v in fit.factors]
            with torch.no_grad():
                for v, m in zip(fit.factors, group_masks, strict=True):
                    v.mul_(m)
        if split is not None:
            for i, layer in enumerate(group):
                x, y = cache.inputs[layer][split[1]], cache.outputs[layer][split[1]]
                errors[layer] = _relative_error(lambda t, i=i, m=fit: m.block(i, t), x, y)
                log.info(
                    "block %d: relative MSE %.5f (SVD + one-shot pruning %.5f)",
                    layer,
                    errors[layer],
                    svd_errors[layer],
                )
        bases.append(fit.base.detach())
        for i, layer in enumerate(group):
            for j in (2 * i, 2 * i + 1):
                factors[layer, j % 2], masks[layer, j % 2] = fit.factors[j].detach(), group_masks[j]
                biases[layer, j % 2] = fit.biases[j].detach()

    structure = {
        "version": FORMAT_VERSION,
        "groups": groups,
        "ranks": ranks,
        "nnz": [[kept(r * width, sparsity)] * 2 for g, r in zip(groups, ranks, strict=True) for _ in g],
        "sparsity": sparsity,
        "budget": budget,
        "group_size": group_size,
    }
    pairs = attach_fips(model, structure)
    with torch.no_grad():
        for g, base in enumerate(bases):
            model.fips_bases[g].copy_(base)
        for layer, pair in enumerate(pairs):
            for which, linear in enumerate(pair):
                linear.set_factor(factors[layer, which], masks[layer, which])
                if linear.bias is not None:
                    linear.bias.copy_(biases[layer, which])
    report = {
        "fit": {
            "steps": steps if split is not None else 0,
            "lr": lr,
            "batch_tokens": batch_tokens,
            "seed": seed,
            "seconds": round(time.perf_counter() - started, 1),
        }
    }
    if split is not None:
        report["reconstruction"] = {
            "relative_mse": errors,
            "relative_mse_svd": svd_errors,
            "heldout_tokens": int(split[1].numel()),
            "train_tokens": int(split[0].numel()),
            "documents": cache.documents,
        }
    return report


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().cpu()

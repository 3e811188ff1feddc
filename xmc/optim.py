"""Low-precision classifier state: bf16 weights and AdamW moments with stochastic rounding, no fp32 copy.

At millions of labels the classifier's state is most of a training step's memory: fp32 weights, their
gradient and two fp32 AdamW moments are 16 bytes a weight. Kept in bf16 they are 8. Plain bf16 weights
lose small updates: an update below half a bf16 step (2**-8 of the weight) rounds away every time. Rounding
stochastically instead (up with probability equal to the remainder's share of the step) keeps each update
right in expectation, which is how ELMO (ICML 2025) trains pure-bf16 classifiers.

``stochastic_round_`` writes an fp32 tensor into a bf16 one that way: add uniform noise below the 16 bits
bf16 drops to the fp32 bit pattern, then truncate. ``LowPrecisionAdamW`` is AdamW (decoupled weight decay,
bias-corrected moments) over bf16 parameters whose update is computed in fp32 a block of elements at a
time, so the fp32 temporaries stay small.
"""

from __future__ import annotations

import torch

__all__ = ["LowPrecisionAdamW", "stochastic_round_"]

_LOW_16 = 0xFFFF
_KEEP_HIGH = -65536  # int32 with the low 16 bits clear (0xFFFF0000)


def stochastic_round_(
    out: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """``out`` (bf16) <- ``value`` (fp32, same shape) rounded stochastically: to one of the two nearest bf16
    numbers, up with probability (value - lower) / (upper - lower), so ``E[out] = value``. Non-finite
    values round to nearest."""
    if out.dtype != torch.bfloat16 or value.dtype != torch.float32 or out.shape != value.shape:
        raise ValueError(f"need a bf16 out and an fp32 value of one shape, got {out.dtype} and {value.dtype}")
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(
        0, _LOW_16 + 1, bits.shape, generator=generator, dtype=torch.int32, device=bits.device
    )
    # Adding to the bit pattern adds to the magnitude for either sign: a carry past bit 16 is rounding
    # away from zero, with the probability above.
    rounded = ((bits + noise) & _KEEP_HIGH).view(torch.float32)
    out.copy_(torch.where(torch.isfinite(value), rounded, value))


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters with bf16 moments, stochastically rounded, no fp32 master copy.

    Args:
        params: bf16 parameters (or groups).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, ``p -= lr * wd * p``).
        seed: keys the rounding noise (step by step), so a run repeats.
        block: elements updated at a time in fp32 (bounds the temporaries: ~6 fp32 copies of a block).

    State per parameter: ``step`` (a count), ``exp_avg`` and ``exp_avg_sq`` (bf16, the parameter's shape, so
    SET rewiring resets them for regrown slots like AdamW's).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
        block: int = 1 << 22,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"LowPrecisionAdamW keeps bf16 parameters, got one of {p.dtype}")
        self.seed, self.block = seed, block
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(self.seed * 1_000_003 + step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                step = state["step"]
                correction1, correction2 = 1 - beta1**step, 1 - beta2**step
                gen = self._generator(p.device, step)
                flat_p, flat_g = p.data.view(-1), p.grad.reshape(-1)
                flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for lo in range(0, flat_p.numel(), self.block):
                    hi = min(lo + self.block, flat_p.numel())
                    g = flat_g[lo:hi].float()
                    m = flat_m[lo:hi].float().mul_(beta1).add_(g, alpha=1 - beta1)
                    v = flat_v[lo:hi].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    update = (m / correction1).div_((v / correction2).sqrt_().add_(eps))
                    w = flat_p[lo:hi].float().mul_(1 - lr * decay).add_(update, alpha=-lr)
                    stochastic_round_(flat_p[lo:hi], w, gen)
                    stochastic_round_(flat_m[lo:hi], m, gen)
                    stochastic_round_(flat_v[lo:hi], v, gen)
        return loss

    def state_dict(self):
        out = super().state_dict()
        out["seed"] = self.seed
        return out

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        self.seed = int(state_dict.pop("seed", self.seed))
        super().load_state_dict(state_dict)

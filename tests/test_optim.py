"""Low-precision classifier state: stochastic rounding, bf16 AdamW, and the training option."""

from __future__ import annotations

import pytest
import torch

from xmc.optim import LowPrecisionAdamW, stochastic_round_


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(0)
    value = torch.tensor([1.0 + 2**-10, -3.0 - 2**-9, 1e-3, 0.0, float("inf")])
    draws = torch.empty(20_000, 5, dtype=torch.bfloat16)
    stochastic_round_(draws, value.expand(20_000, 5), gen)  # 20,000 independent draws of each value
    for j in range(4):
        v = value[j].item()
        ulp = 2.0 ** (torch.frexp(value[j]).exponent.item() - 8) if v else 0.0  # bf16 keeps 8 bits
        seen = set(draws[:, j].float().tolist())
        assert len(seen) <= 2 and all(abs(x - v) <= ulp for x in seen), (v, seen)
        assert draws[:, j].double().mean().item() == pytest.approx(v, rel=2e-3, abs=1e-9)
    assert draws[0, 4].item() == float("inf")
    # 1 + 2**-10 lies 1/8 of the way from 1 to the next bf16 number, 1 + 2**-7: rounded up 1/8 of the time.
    share = (draws[:, 0].float() > 1.0).double().mean().item()
    assert share == pytest.approx(1 / 8, abs=0.01)


def test_low_precision_adamw_tracks_fp32_adamw():
    """Least squares from the same start: the bf16 weights end within bf16 resolution of fp32 AdamW's, and
    updates far below half a bf16 step still move them (plain rounding would freeze them)."""
    gen = torch.Generator().manual_seed(1)
    X, w_true = torch.randn(256, 32, generator=gen), torch.randn(32, 1, generator=gen)
    y = X @ w_true
    w32 = torch.zeros(32, 1, requires_grad=True)
    w16 = torch.zeros(32, 1, dtype=torch.bfloat16, requires_grad=True)
    opt32 = torch.optim.AdamW([w32], lr=0.01, weight_decay=1e-4)
    opt16 = LowPrecisionAdamW([w16], lr=0.01, weight_decay=1e-4, seed=3, block=7)  # blocks of 7: 5 blocks
    for _ in range(600):
        for w, opt in ((w32, opt32), (w16, opt16)):
            opt.zero_grad()
            ((X @ w.float() - y) ** 2).mean().backward()
            opt.step()
    assert w16.dtype == torch.bfloat16 and opt16.state[w16]["exp_avg"].dtype == torch.bfloat16
    assert float((w16.detach().float() - w32.detach()).abs().max()) < 0.05
    assert float(((X @ w16.detach().float() - y) ** 2).mean()) < 1e-2

    tiny = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    opt = LowPrecisionAdamW([tiny], lr=1e-4, weight_decay=0.0)  # each step ~1e-4, a bf16 step near 1 is 2**-7
    for _ in range(50):
        tiny.grad = torch.ones_like(tiny)
        opt.step()
    assert float(tiny.detach().float().mean()) == pytest.approx(1 - 50 * 1e-4, abs=2e-4)


def test_low_precision_adamw_state_round_trips():
    w = torch.randn(10, 3).bfloat16().requires_grad_()
    opt = LowPrecisionAdamW([w], lr=0.1, seed=5)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state_dict()
    again = LowPrecisionAdamW([w], lr=0.1, seed=0)
    again.load_state_dict(state)
    assert again.seed == 5 and again.state[w]["step"] == 1
    assert torch.equal(again.state[w]["exp_avg"], opt.state[w]["exp_avg"])
    with pytest.raises(ValueError, match="bf16 parameters"):
        LowPrecisionAdamW([torch.zeros(3, requires_grad=True)])

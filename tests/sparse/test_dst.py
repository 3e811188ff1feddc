"""SET rewiring: invariants, shard equivalence, and recovery of a planted sparse map."""

from __future__ import annotations

import torch
from xmc.kernels.hashing import uniform

from xmc.config import SETOptions
from xmc.nn import FixedFanInLinear
from xmc.sparse.dst import SET


def _pairs(layer: FixedFanInLinear) -> dict[tuple[int, int], int]:
    """(row, column id) -> slot, for every connection."""
    ids = layer.indices.long()
    return {(r, int(ids[r, j])): j for r in range(ids.shape[0]) for j in range(ids.shape[1])}


def _train_a_little(layer, optimizer, steps=3):
    x = torch.randn(16, layer.in_features)
    for _ in range(steps):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()


def test_rewiring_invariants_with_adam_and_sgd():
    torch.manual_seed(0)
    for make in (lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)):
        layer = FixedFanInLinear(30, 25, 6, seed=5)
        optimizer = make(layer.parameters())
        dst = SET(layer, total_steps=100, config=SETOptions(interval=1, fraction=0.5), optimizer=optimizer)
        for step in range(1, 5):
            _train_a_little(layer, optimizer)
            states = {
                k: v.clone()
                for k, v in optimizer.state[layer.weight].items()
                if v.shape == layer.weight.shape
            }
            assert states, "the optimizer keeps per-slot state"
            old_pairs, old_w = _pairs(layer), layer.weight.detach().clone()
            changed = dst.rewire(step)
            assert changed == 25 * 3  # round(0.5 * 6) per row, cosine barely decayed
            ids = layer.indices.long()
            s = torch.sort(ids, 1).values
            assert not bool((s[:, 1:] == s[:, :-1]).any()), "ids stay distinct"
            new_pairs = _pairs(layer)
            kept = 0
            for (row, col), slot in new_pairs.items():
                if (row, col) in old_pairs and old_pairs[(row, col)] == slot and old_w[row, slot] != 0:
                    # unpruned pair: same slot, same weight, same optimizer state
                    kept += 1
                    assert layer.weight[row, slot] == old_w[row, slot]
                    for name, before in states.items():
                        assert optimizer.state[layer.weight][name][row, slot] == before[row, slot]
            assert kept == 25 * 3
            regrown = layer.weight.detach() == 0
            assert int(regrown.sum()) == 25 * 3
            for name in states:
                assert bool((optimizer.state[layer.weight][name][regrown] == 0).all()), name


def test_schedule_stops_at_end_and_decays():
    layer = FixedFanInLinear(20, 4, 4)
    dst = SET(layer, total_steps=100, config=SETOptions(interval=10, end=0.5, fraction=0.4, floor=0.0))
    rewired = [s for s in range(1, 101) if dst.step() is not None]
    assert rewired == [10, 20, 30, 40, 50]
    assert abs(dst.knob(0) - 0.4) < 1e-12 and abs(dst.knob(25) - 0.2) < 1e-12 and dst.knob(50) == 0.0
    state = dst.state_dict()
    again = SET(layer, total_steps=1)
    again.load_state_dict(state)
    assert again.steps == 100 and again.rewirings == 5 and again.config == dst.config


def _set_weights(layer: FixedFanInLinear, step: int) -> None:
    """Weights as a pure function of (step, global row, slot): both shard layouts see the same values."""
    rows = torch.arange(layer.out_features)[:, None] + layer.row_offset
    slots = torch.arange(layer.fan_in)[None, :]
    with torch.no_grad():
        layer.weight.copy_(uniform(99, step, rows, slots).float() - 0.5)


def test_label_shards_rewire_like_the_whole_layer():
    for prune in ("fraction", "threshold"):
        config = SETOptions(interval=1, prune=prune, fraction=0.3, threshold=0.2)
        whole = FixedFanInLinear(50, 40, 9, seed=7)
        parts = [
            FixedFanInLinear(50, 20, 9, seed=7, row_offset=0),
            FixedFanInLinear(50, 20, 9, seed=7, row_offset=20),
        ]
        schedulers = [SET(m, total_steps=20, config=config) for m in (whole, *parts)]
        for step in range(1, 7):
            for layer in (whole, *parts):
                _set_weights(layer, step)
            for dst in schedulers:
                dst.rewire(step)
        for name in ("indices", "weight", "bias"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name)), (
                prune,
                name,
            )


def _fit_planted(rewire: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    D, K, L, steps = 64, 8, 32, 3000
    target = FixedFanInLinear(D, L, K, bias=False, seed=100)
    with torch.no_grad():  # planted weights bounded away from zero: +-[0.5, 1.5]
        sign = torch.where(torch.rand(L, K) < 0.5, -1.0, 1.0)
        target.weight.copy_(sign * (0.5 + torch.rand(L, K)))
    model = FixedFanInLinear(D, L, K, bias=False, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    config = SETOptions(interval=10, end=0.8, prune="threshold", threshold=0.15, floor=0.05)
    dst = SET(model, steps, config, optimizer) if rewire else None
    for _ in range(steps):
        x = torch.randn(128, D)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target(x).detach()).backward()
        optimizer.step()
        schedule.step()
        if dst is not None:
            dst.step()
    x = torch.randn(4096, D)
    with torch.no_grad():
        error = float(torch.linalg.norm(model(x) - target(x)) / torch.linalg.norm(target(x)))
    found = len(set(_pairs(model)) & set(_pairs(target))) / (L * K)
    return error, found


def test_set_recovers_a_planted_sparse_map_and_frozen_ids_do_not():
    error, found = _fit_planted(rewire=True)
    assert error < 0.05 and found >= 0.9, (error, found)
    frozen_error, frozen_found = _fit_planted(rewire=False)
    assert frozen_error > 0.5, frozen_error

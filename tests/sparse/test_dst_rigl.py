"""Gradient regrowth (RigL) and SRigL neuron ablation: exact picks against dense computations,
constant fan-in, the parameter budget, optimizer state, checkpoints, and training end to end."""

from __future__ import annotations

import pytest
import torch

import xmc.sparse.dst as dst_module
from xmc.classifiers import FixedFanInClassifier
from xmc.config import SETOptions
from xmc.losses import Positives, dense_loss
from xmc.nn import AblatableFixedFanInLinear, FixedFanInLinear
from xmc.sparse.dst import SET, grow_by_gradient


def _expected_picks(ids: torch.Tensor, fill: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Row by row, in plain Python: the absent columns by decreasing |grad|, into filled slots in order."""
    out = ids.clone().long()
    for r in range(ids.shape[0]):
        held = {int(ids[r, j]) for j in range(ids.shape[1]) if not fill[r, j]}
        ranked = sorted(
            (c for c in range(grad.shape[1]) if c not in held), key=lambda c: -abs(float(grad[r, c]))
        )
        slots = [j for j in range(ids.shape[1]) if fill[r, j]]
        for j, column in zip(slots, ranked, strict=False):
            out[r, j] = column
    return out


def test_grow_by_gradient_takes_the_largest_absent_columns():
    torch.manual_seed(0)
    layer = FixedFanInLinear(40, 23, 7, seed=3)
    ids = layer.indices.long()
    fill = torch.rand(23, 7) < 0.4
    fill[0] = True  # a row regrowing everything
    fill[1] = False  # a row regrowing nothing
    grad = torch.randn(23, 40)
    picked, score = grow_by_gradient(ids, fill, grad)
    assert torch.equal(picked, _expected_picks(ids, fill, grad))
    assert torch.equal(score[fill], grad.abs()[torch.arange(23)[:, None].expand(-1, 7)[fill], picked[fill]])
    s = torch.sort(picked, 1).values
    assert not bool((s[:, 1:] == s[:, :-1]).any())


def test_gradient_rewiring_matches_a_dense_computation_in_row_chunks(monkeypatch):
    monkeypatch.setattr(dst_module, "_GRAD_ELEMENTS", 3 * 50)  # rows of 50 columns: chunks of 3 rows
    torch.manual_seed(1)
    layer = FixedFanInLinear(50, 11, 8, seed=2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01)
    x = torch.randn(16, 50)
    optimizer.zero_grad()
    layer(x).square().mean().backward()
    optimizer.step()
    grad = torch.randn(11, 50)
    chunks = []

    def grad_fn(start, stop):
        chunks.append((start, stop))
        return grad[start:stop]

    config = SETOptions(interval=1, fraction=0.25, regrow="gradient")
    dst = SET(layer, total_steps=100, config=config, optimizer=optimizer)
    before_ids, before_w = layer.indices.long().clone(), layer.weight.detach().clone()
    prune = dst._prune_mask(before_w.abs(), dst.knob(1))
    changed = dst.step(grad_fn)
    assert chunks == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert changed == 11 * 2 and int(prune.sum()) == 22
    assert torch.equal(layer.indices.long(), _expected_picks(before_ids, prune, grad))
    assert layer.weight.shape == (11, 8)  # fan-in constant
    assert torch.equal(layer.weight.detach()[~prune], before_w[~prune])
    assert bool((layer.weight.detach()[prune] == 0).all())
    assert bool((optimizer.state[layer.weight]["exp_avg"][prune] == 0).all())


def test_zero_gradient_slots_regrow_at_random_like_set():
    layer = FixedFanInLinear(30, 6, 5, seed=4)
    config = SETOptions(interval=1, fraction=0.4, regrow="gradient")
    dst = SET(layer, total_steps=10, config=config)
    grad = torch.zeros(6, 30)
    grad[:, 29] = 1.0  # one informative column per row; the second regrown slot has no signal
    before = layer.indices.long().clone()
    dst.rewire(1, lambda start, stop: grad[start:stop])
    ids = layer.indices.long()
    regrown = ids != before
    assert bool((ids == 29).any(1)[~(before == 29).any(1)].all())  # the informative column is taken
    assert bool((regrown.sum(1) >= 1).all())
    s = torch.sort(ids, 1).values
    assert not bool((s[:, 1:] == s[:, :-1]).any())


def test_gradient_regrowth_needs_a_gradient():
    layer = FixedFanInLinear(10, 4, 3)
    with pytest.raises(ValueError, match="grad_fn"):
        SET(layer, 10, SETOptions(interval=1, regrow="gradient")).step()
    with pytest.raises(ValueError, match="regrow=gradient"):
        SET(layer, 10, SETOptions(gamma=0.3))
    with pytest.raises(ValueError, match="grad_batches=4 sums gradients"):
        SET(layer, 10, SETOptions(grad_batches=4))
    SET(layer, 10, SETOptions(regrow="gradient", grad_batches=4))  # the setting it belongs to
    with pytest.raises(ValueError, match="classifier.set.fraction must be in"):
        SET(layer, 10, SETOptions(fraction=1.5))
    with pytest.raises(ValueError, match="never labels"):
        SET(layer, 10, SETOptions(regrow="gradient", gamma=0.3))


def test_classifier_dense_gradient_equals_autograd_on_the_dense_weight():
    torch.manual_seed(2)
    clf = FixedFanInClassifier(12, 37, 4, seed=1).double()
    h = torch.randn(5, 12, dtype=torch.float64)
    positives = Positives.from_lists([[0, 3], [36], [], [5, 5, 6], [20]], 37)
    for kind in ("bce", "squared_hinge"):
        dense = clf.layer.to_dense().detach().requires_grad_(True)
        dense_loss(h @ dense.t() + clf.layer.bias.detach(), positives, kind).backward()
        parts = [clf.dense_gradient(h, positives, kind, a, min(a + 10, 37)) for a in range(0, 37, 10)]
        torch.testing.assert_close(torch.cat(parts).double(), dense.grad, rtol=1e-5, atol=1e-7)


class _Bare(torch.nn.Module):
    """The parts of a model :class:`~xmc.sparse.rewiring.Rewiring` touches: an encoder whose output it
    keeps, no intermediate layer, a fixed fan-in classifier."""

    def __init__(self, classifier):
        super().__init__()
        self.encoder, self.intermediate, self.classifier = torch.nn.Identity(), None, classifier


def test_gradient_regrowth_sums_the_last_n_batches_at_the_current_weights():
    from xmc.config import Config
    from xmc.sparse.rewiring import Rewiring

    torch.manual_seed(4)
    model = _Bare(FixedFanInClassifier(40, 9, 4, seed=1))
    config = Config()
    config.classifier.set = SETOptions(interval=5, fraction=0.25, regrow="gradient", grad_batches=3)
    rewiring = Rewiring(config, model, total_steps=20, optimizers=[])
    h = torch.randn(7, 6, 40)
    h[:3] *= torch.rand(3, 6, 40) < 0.05  # three mostly-zero batches (kept sparse), then dense ones
    positives = [Positives.from_lists([[s % 9], [], [1, 2], [8], [0], [s % 4]], 9) for s in range(7)]
    wanted, before = [], None
    for step in range(1, 8):  # the optimizer steps 1..7; the rewiring is due at step 5
        wanted.append(rewiring.wants_batch())
        if wanted[-1]:
            with rewiring.capture(positives[step - 1]):
                model.encoder(h[step - 1])
        if step == 5:
            kept = [seen["h"].layout for _, seen, _ in rewiring._kept]
            got = rewiring._grad_fn("classifier")(0, 9)
            clf, gradient = model.classifier, model.classifier.dense_gradient
            expected = sum(gradient(h[s], positives[s], "squared_hinge", 0, 9) for s in (2, 3, 4))
            before = clf.layer.indices.clone()
        rewiring.step()
    assert wanted == [False, False, True, True, True, False, False]
    assert kept == [torch.sparse_coo, torch.strided, torch.strided]  # batches 3-5: the third mostly zero
    torch.testing.assert_close(got, expected)
    assert not torch.equal(clf.layer.indices, before), "the rewiring at step 5 regrew"
    assert not rewiring._kept, "nothing kept once no rewiring is near"


def test_grad_batches_must_be_positive(tmp_path):
    from xmc.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("classifier: {set: {regrow: gradient, grad_batches: 0}}\n")
    with pytest.raises(ValueError, match="grad_batches"):
        load_config(path)


def _ablation_setup(gamma=0.5):
    torch.manual_seed(3)
    layer = AblatableFixedFanInLinear(20, 10, 4, seed=6)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01)
    layer(torch.randn(8, 20)).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        layer.weight[:] = torch.tensor([1.0, -0.9, 0.01, -0.02])  # two salient connections per neuron...
        layer.weight[[2, 7]] = 1e-6  # ...but two neurons with nothing salient by magnitude...
    grad = torch.rand(10, 20) + 0.5
    grad[[2, 7]] = 0.0  # ...nor by gradient
    config = SETOptions(interval=1, fraction=0.5, regrow="gradient", gamma=gamma)
    return layer, optimizer, grad, SET(layer, total_steps=100, config=config, optimizer=optimizer)


def test_ablation_removes_unsalient_neurons_and_keeps_the_budget():
    layer, optimizer, grad, dst = _ablation_setup()
    x = torch.randn(3, 20)
    before_w, before_ids = layer.weight.detach().clone(), layer.indices.long().clone()
    prune = dst._prune_mask(before_w.abs(), dst.knob(1))
    dst.rewire(1, lambda start, stop: grad[start:stop])
    survivors = [r for r in range(10) if r not in (2, 7)]
    assert layer.neurons.tolist() == survivors
    assert layer.fan_in == 40 // 8 == layer.weight.shape[1] and layer.budget == 40
    assert layer.num_active * layer.fan_in <= layer.budget
    assert layer.indices.shape == (8, 5) and layer.bias.shape == (8,)
    s = torch.sort(layer.indices.long(), 1).values
    assert not bool((s[:, 1:] == s[:, :-1]).any())
    # unpruned connections stay in their slots with their weights and Adam state; the rest start at 0
    keep = ~prune[survivors]
    assert torch.equal(layer.weight.detach()[:, :4][keep], before_w[survivors][keep])
    assert torch.equal(layer.indices.long()[:, :4][keep], before_ids[survivors][keep])
    assert bool((layer.weight.detach()[:, :4][~keep] == 0).all()) and bool(
        (layer.weight.detach()[:, 4] == 0).all()
    )
    for name in ("exp_avg", "exp_avg_sq"):
        assert optimizer.state[layer.weight][name].shape == (8, 5)
        assert optimizer.state[layer.bias][name].shape == (8,)
    y = layer(x)
    assert y.shape == (3, 10) and bool((y[:, [2, 7]] == 0).all())
    torch.testing.assert_close(
        y, x @ layer.to_dense().t() + torch.zeros(10).index_copy(0, layer.neurons, layer.bias.detach())
    )
    # the optimizer steps the resized parameters
    optimizer.zero_grad()
    layer(x).square().mean().backward()
    optimizer.step()


def test_ablated_layer_checkpoint_round_trip():
    layer, _, grad, dst = _ablation_setup()
    dst.rewire(1, lambda start, stop: grad[start:stop])
    fresh = AblatableFixedFanInLinear(20, 10, 4, seed=6)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20)
    assert fresh.fan_in == layer.fan_in and torch.equal(fresh.neurons, layer.neurons)
    torch.testing.assert_close(fresh(x), layer(x))


RUN_CONFIG = """
data: {{train: '{data}/train.txt', test: '{data}/test.txt', dev_fraction: 0.0, format: bow}}
encoder: {{type: bow, dim: 24, min_df: 1, dropout: 0.1}}
classifier:
  type: fixed_fanin
  fan_in: 6
  intermediate: 16
  intermediate_fan_in: 8
  set: {{interval: 3, fraction: 0.3, regrow: gradient, gamma: 0.6}}
train: {{epochs: 2, batch_size: 32, encoder_lr: 0.01, classifier_lr: 0.03, warmup: 0.0}}
"""


def test_srigl_run_ablates_regrows_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from xmc.config import load_config
    from xmc.data.synth import SynthOptions, synthesize
    from xmc.train.run import run_training

    data = tmp_path / "data"
    options = SynthOptions(
        num_labels=40,
        num_train=300,
        num_test=60,
        labels_per_doc=3,
        exponent=0.8,
        num_features=200,
        format="bow",
        seed=2,
    )
    synthesize(data, options, progress=False)
    (tmp_path / "config.yaml").write_text(RUN_CONFIG.format(data=data))
    config = load_config(tmp_path / "config.yaml")

    def interrupt(model, step, optimizers, scaler):
        if step == 7:  # after two rewirings (steps 3 and 6)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(config, str(tmp_path / "cut"), progress=False, step_hook=interrupt)
    resumed = run_training(config, str(tmp_path / "cut"), resume=True, progress=False)
    whole = run_training(config, str(tmp_path / "whole"), progress=False)
    assert resumed["optimizer_steps"] == whole["optimizer_steps"]
    a, b = (
        load_file(str(tmp_path / "cut" / "best.safetensors")),
        load_file(str(tmp_path / "whole" / "best.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    neurons, weight = b["intermediate.neurons"], b["intermediate.weight"]
    assert 0 < neurons.numel() < 16, "gamma=0.6 ablates some of the 16 neurons"
    assert weight.shape == (neurons.numel(), min(24, 16 * 8 // neurons.numel()))
    assert b["classifier.layer.weight"].shape == (40, 6), "labels are never ablated"


def test_a_run_stopped_between_kept_batches_resumes_to_the_same_regrowth(tmp_path):
    """grad_batches = 3: the checkpoint written by Ctrl-C holds the batches kept so far, and the window cut
    short replaces its own batch when run again, so the resumed run regrows from the same batches as an
    uninterrupted one."""
    from safetensors.torch import load_file

    from xmc.config import load_config
    from xmc.data.synth import SynthOptions, synthesize
    from xmc.train.run import run_training

    data = tmp_path / "data"
    options = SynthOptions(
        num_labels=30, num_train=256, num_test=40, labels_per_doc=3, num_features=300, format="bow", seed=3
    )
    synthesize(data, options, progress=False)
    (tmp_path / "config.yaml").write_text(
        f"""
data: {{train: '{data}/train.txt', test: '{data}/test.txt', dev_fraction: 0.0, format: bow}}
encoder: {{type: bow, dim: 0, min_df: 1, dropout: 0.0}}
classifier:
  type: fixed_fanin
  fan_in: 8
  ids: centroid
  set: {{interval: 4, end: 0.9, fraction: 0.3, regrow: gradient, grad_batches: 3}}
train: {{epochs: 2, batch_size: 16, classifier_lr: 0.05, warmup: 0.0}}
"""
    )
    config = load_config(tmp_path / "config.yaml")

    def interrupt(model, step, optimizers, scaler):
        if step == 6:  # step 6's batch kept for the rewiring at 8; the window of step 7 cut short
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(config, str(tmp_path / "cut"), progress=False, step_hook=interrupt)
    resumed = run_training(config, str(tmp_path / "cut"), resume=True, progress=False)
    whole = run_training(config, str(tmp_path / "whole"), progress=False)
    assert resumed["optimizer_steps"] == whole["optimizer_steps"] == 32
    a, b = (
        load_file(str(tmp_path / "cut" / "best.safetensors")),
        load_file(str(tmp_path / "whole" / "best.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

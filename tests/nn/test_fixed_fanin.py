"""FixedFanInLinear: ids, keyed initialization, dense conversion, state dicts."""

from __future__ import annotations

import pytest
import torch

from xmc.nn import FixedFanInLinear


def _distinct_rows(ids: torch.Tensor) -> bool:
    s = torch.sort(ids.long(), dim=1).values
    return not bool((s[:, 1:] == s[:, :-1]).any())


@pytest.mark.parametrize(
    "in_features, expected", [(40, torch.int16), (32767, torch.int16), (32768, torch.int32)]
)
def test_index_dtype_and_distinct_ids(in_features, expected):
    layer = FixedFanInLinear(in_features, 50, 7, seed=3)
    assert layer.indices.dtype == expected
    assert layer.indices.shape == (50, 7) and layer.weight.shape == (50, 7) and layer.bias.shape == (50,)
    assert _distinct_rows(layer.indices)
    assert int(layer.indices.min()) >= 0 and int(layer.indices.max()) < in_features


def test_dense_fan_in_equal_to_width():
    layer = FixedFanInLinear(9, 20, 9)  # every row must hold every column once
    assert torch.equal(torch.sort(layer.indices.long(), 1).values, torch.arange(9).expand(20, 9))


def test_init_is_keyed_by_seed_and_global_row():
    whole = FixedFanInLinear(30, 101, 5, seed=11)
    low = FixedFanInLinear(30, 50, 5, seed=11, row_offset=0)
    high = FixedFanInLinear(30, 51, 5, seed=11, row_offset=50)
    for name in ("weight", "indices", "bias"):
        joined = torch.cat([getattr(low, name), getattr(high, name)])
        assert torch.equal(joined, getattr(whole, name)), name
    other = FixedFanInLinear(30, 101, 5, seed=12)
    assert not torch.equal(other.indices, whole.indices)
    bound = 1 / 5**0.5
    weight = whole.weight.detach()
    assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 3


def test_forward_matches_dense_masked_weight_in_float64():
    torch.manual_seed(0)
    layer = FixedFanInLinear(23, 37, 4, dtype=torch.float64)
    x = torch.randn(5, 23, dtype=torch.float64)
    expected = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert "fan_in=4" in repr(layer) and "ids=int16" in repr(layer)
    with pytest.raises(ValueError, match="width 23"):
        layer(torch.randn(2, 22, dtype=torch.float64))


def test_from_dense_keeps_largest_magnitudes():
    dense = torch.tensor([[0.1, -3.0, 2.0, 0.0], [1.0, 1.0, -1.0, 0.5]])
    layer = FixedFanInLinear.from_dense(dense, 2, bias=torch.tensor([0.5, -0.5]))
    assert layer.indices.tolist() == [[1, 2], [0, 1]]  # ties: the lower column wins
    assert layer.weight.tolist() == [[-3.0, 2.0], [1.0, 1.0]]
    back = layer.to_dense()
    assert back.tolist() == [[0.0, -3.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


def test_state_dict_round_trip_and_transpose_cache():
    a = FixedFanInLinear(64, 40, 8, seed=1)
    b = FixedFanInLinear(64, 40, 8, seed=2)
    before = b.column_transpose()
    b.load_state_dict(a.state_dict())
    for name in ("weight", "indices", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    after = b.column_transpose()
    assert not torch.equal(before[1], after[1])  # the cached column view followed the new ids
    assert torch.equal(after[1], a.column_transpose()[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="fan_in must be in 1..in_features"):
        FixedFanInLinear(4, 10, 5)
    with pytest.raises(ValueError, match="fan_in must be in 1..in_features"):
        FixedFanInLinear(4, 10, 0)

"""A fixed fan-in layer whose output neurons can be ablated (SRigL's structured sparsity).

SRigL removes a neuron once too few of its connections are salient and hands its share of the
parameter budget to the survivors, whose fan-in grows so that ``active x fan_in`` stays within
``out_features x initial fan-in``. The layer keeps its output width (the next layer reads every
position); an ablated output is exactly 0, bias included. :mod:`xmc.sparse.dst` decides which neurons go and
calls :meth:`AblatableFixedFanInLinear.set_rows`.
"""

from __future__ import annotations

import torch
from torch import nn

from xmc.kernels.fixed_fanin import fixed_fanin
from xmc.nn.fixed_fanin import FixedFanInLinear


class AblatableFixedFanInLinear(FixedFanInLinear):
    """``FixedFanInLinear`` with an ``neurons`` buffer (int64, increasing): the output positions of
    the active neurons. ``weight`` / ``indices`` / ``bias`` hold one row per active neuron, so after an
    ablation their first dimension is ``len(neurons) < out_features`` and ``fan_in`` may have grown.
    Regrowth hashes use the neuron's output position as its row key, so a neuron draws the same ids
    whatever was ablated before it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.row_offset:
            raise ValueError("an ablatable layer is never a shard: row_offset must be 0")
        self.register_buffer("neurons", torch.arange(self.out_features, device=self.weight.device))
        self.budget = self.out_features * self.fan_in  # connections, kept across ablations

    @property
    def num_active(self) -> int:
        return self.neurons.numel()

    def global_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.neurons[start:stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, out_features), zeros at ablated positions."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs of width {self.in_features}, got shape {tuple(x.shape)}")
        out = fixed_fanin(x, self.weight, self.indices, self.bias, transpose=self.column_transpose())
        if self.num_active == self.out_features:
            return out
        full = out.new_zeros(*out.shape[:-1], self.out_features)
        return full.index_copy(-1, self.neurons, out)

    @torch.no_grad()
    def set_rows(
        self, neurons: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """Replace the active set: ``neurons`` (n,), ``weight`` / ``indices`` (n, K'), ``bias`` (n,).

        The parameters keep their identity (an optimizer still holds them) while their shape changes;
        their gradients are dropped, and per-parameter optimizer state must be remapped by the caller."""
        n, fan_in = weight.shape
        if indices.shape != (n, fan_in) or neurons.shape != (n,):
            raise ValueError("neurons, weight and indices disagree in shape")
        if n * fan_in > self.budget:
            raise ValueError(f"{n} neurons x fan-in {fan_in} exceed the budget of {self.budget} connections")
        _reshape_parameter(self.weight, weight)
        self.indices = indices.to(self.indices.dtype).contiguous()
        self.neurons = neurons.to(torch.int64).contiguous()
        if self.bias is not None:
            _reshape_parameter(self.bias, bias)
        self.fan_in = fan_in

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint taken after an ablation holds fewer, wider rows: take its shapes first.
        weight, neurons = state_dict.get(prefix + "weight"), state_dict.get(prefix + "neurons")
        if weight is not None and neurons is not None and weight.shape != self.weight.shape:
            n, fan_in = weight.shape
            _reshape_parameter(self.weight, self.weight.new_empty(n, fan_in))
            self.indices = self.indices.new_empty(n, fan_in)
            self.neurons = self.neurons.new_empty(n)
            if self.bias is not None:
                _reshape_parameter(self.bias, self.bias.new_empty(n))
            self.fan_in = fan_in
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight, zero rows at ablated neurons."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device
        )
        rows = dense.new_zeros(self.num_active, self.in_features)
        rows.scatter_(1, self.indices.long(), self.weight.detach())
        return dense.index_copy_(0, self.neurons, rows)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active={self.num_active}, budget={self.budget}"


def _reshape_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the shape and data of ``value`` in place. ``param.data = value`` would keep the
    autograd leaf's gradient accumulator, which still expects the old shape; swapping the tensors
    renews it."""
    fresh = nn.Parameter(value.to(param.dtype).contiguous(), requires_grad=param.requires_grad)
    torch.utils.swap_tensors(param, fresh)

"""Neural-network modules: the fixed fan-in sparse layer, and its variant with neuron ablation."""

from xmc.nn.ablation import AblatableFixedFanInLinear
from xmc.nn.fixed_fanin import FixedFanInLinear

__all__ = ["AblatableFixedFanInLinear", "FixedFanInLinear"]

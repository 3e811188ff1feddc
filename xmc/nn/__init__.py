"""Neural-network modules: the fixed fan-in sparse layer."""

from xmc.nn.fixed_fanin import FixedFanInLinear

__all__ = ["FixedFanInLinear"]

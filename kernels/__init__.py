"""Triton kernels and their pure-PyTorch reference twins, installed as ``xmc.kernels``.

One op per file; each file opens with the math and the memory traffic the op must move.
"""

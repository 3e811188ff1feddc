"""Triton kernels and their pure-PyTorch reference twins.

One op per file; each file opens with the math and the memory traffic the op must move. Shared launch
helpers live in ``_common.py``. Nothing here imports from outside ``xmc/kernels/`` (a test checks), so the
kernels can be read, tested and reused on their own.
"""

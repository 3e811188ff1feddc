"""Triton kernels and their pure-PyTorch reference twins.

One op per file (``fixed_fanin``, ``grouped_fanin``, ``fixed_fanin_loss``, ``rps``, ``fill_distinct``); each
opens with the math and the memory traffic the op must move, and holds its kernels, launchers, dispatch and
autograd Function. The twins of the larger ops have files of their own (``fixed_fanin_reference``,
``grouped_fanin_reference``, ``rps_reference``). Shared pieces: launch helpers in ``_common.py``, the fan-in
layers' checks, column transpose and input-gradient gather in ``fanin_common.py``, the RPS mapping in
``rps_mapping.py``, the counter-based hash in ``hashing.py`` and the per-chunk loss in ``losses.py``. This
folder is installed as ``xmc.kernels``; nothing here imports from outside it nor a private name of another
module, so the kernels can be read, tested and reused on their own.
"""

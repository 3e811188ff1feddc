"""Test setup: the Triton interpreter without CUDA, and caches kept out of the user's home (helpers that tests
import live in ``helpers.py``)."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this variable
# when it is first imported, so it must be set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches into a fresh folder, never into the user's ``~/.cache/xmc``."""
    monkeypatch.setenv("XMC_CACHE", str(tmp_path_factory.mktemp("xmc-cache")))

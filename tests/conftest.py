"""Test setup: the Triton interpreter without CUDA, and caches kept out of the user's home (helpers that tests
import live in ``helpers.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the working directory first on sys.path. From the checkout's root that lets the
# top-level kernels/ folder (installed as xmc.kernels) shadow the Hugging Face `kernels` package, which
# transformers requires and imports (5.x: `ImportError: cannot import name 'CUDAProperties' from 'kernels'`).
# xmc is imported through its install, so the root is dropped before any test imports transformers.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this variable
# when it is first imported, so it must be set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches into a fresh folder, never into the user's ``~/.cache/xmc``."""
    monkeypatch.setenv("XMC_CACHE", str(tmp_path_factory.mktemp("xmc-cache")))

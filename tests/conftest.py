"""Shared test fixtures: paths to committed fixtures and to the optional ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this variable
# when it is first imported, so it must be set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(os.environ.get("XMC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches into a fresh folder, never into the user's ``~/.cache/xmc``."""
    monkeypatch.setenv("XMC_CACHE", str(tmp_path_factory.mktemp("xmc-cache")))


def shared_file(*parts: str) -> Path:
    """A file of ``../shared/data``; the test is skipped when a user's clone lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (only the project's own CI machines have ../shared/data)")
    return path


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite elements (an output element was never written?)"
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"

"""Helpers shared by the tests (importable from any test folder: pytest puts ``tests/`` on the path):
the committed fixtures, the optional ``../shared/data``, and tensor comparisons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(os.environ.get("XMC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ROOT = Path(__file__).resolve().parents[1]  # the repository


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

"""Packaging: every subpackage is installed, `kernels/` as `xmc.kernels`; the hash is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    """Every folder of ``xmc/`` with Python files is a listed package, and ``kernels/`` (the top-level folder
    the project's layout keeps the kernels in) is installed as ``xmc.kernels``, never as ``kernels``."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "xmc").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders | {"xmc.kernels"} <= listed, (
        f"add {sorted(folders - listed)} to [tool.setuptools] packages"
    )
    assert config["package-dir"]["xmc.kernels"] == "kernels"
    assert not any(name == "kernels" or name.startswith("kernels.") for name in listed)


def test_hashing_is_deterministic_and_in_range():
    from xmc.kernels.hashing import hash_keys, uniform

    rows = torch.arange(100_000)
    h = hash_keys(7, rows)
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    assert torch.equal(h, hash_keys(7, rows)) and not torch.equal(h, hash_keys(8, rows))
    assert len(torch.unique(h)) > 99_990  # 32-bit hashes of distinct keys rarely collide
    u = uniform(1, rows[:, None], torch.arange(4)[None, :])
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    big = hash_keys(torch.tensor([2**40 + 1, 2**40 + 2**33 + 1]))
    assert big[0] != big[1]  # the high halves of 64-bit keys count too

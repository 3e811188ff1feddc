"""Shipped configs and data: every YAML under ``configs/`` validates against the schema, the default
config finds the shipped dataset from any working directory, and the dataset matches its checksums."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import shared_file

from xmc.config import Config, default_config_path, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))  # recursive: nested folders count too
SMALL = ROOT / "data" / "eurlex57k-small"
SMALL_FILES = ("trn.json.gz", "tst.json.gz", "lbl.json.gz")


def _checksums_in_readme() -> dict[str, str]:
    """``name -> sha256`` from the ``HASH  eurlex57k-small/NAME`` lines of ``data/README.md``."""
    text = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.MULTILINE)}


def test_the_config_folders_are_all_found():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    assert {"default.yaml", "eurlex57k/meta.yaml", "repository/amazon-3m.yaml"} <= names
    assert len(names) >= 16


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_shipped_config_validates(path):
    config = load_config(path)  # raises ConfigError on an unknown key, a bad type or a bad choice
    assert isinstance(config, Config)
    assert config.data.train and config.data.test, "every config names its train and test data"
    if config.data.format == "text":
        assert "," in config.data.train and "," in config.data.test, "text format takes texts,labels pairs"
    if config.encoder.type == "transformer":
        name = config.encoder.name_or_path
        assert name == "minilm" or name.startswith("models/"), f"{name}: not a local folder"
    if config.classifier.type == "fixed_fanin" and config.classifier.meta.enabled:
        assert config.classifier.meta.cutoff_epoch < config.train.epochs
    assert 0 < config.classifier.set.end <= 1


def test_default_config_uses_the_shipped_data():
    config = load_config(CONFIG_DIR / "default.yaml")
    assert config.data.format == "lf-json"
    for value, name in ((config.data.train, "trn"), (config.data.test, "tst"), (config.data.labels, "lbl")):
        path = Path(value)
        assert path.is_absolute() and path.is_file(), f"{value} not resolved to a shipped file"
        assert path.resolve() == SMALL / f"{name}.json.gz"


def test_default_config_loads_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_config_path() == CONFIG_DIR / "default.yaml"
    config = load_config(None)
    assert config == load_config(CONFIG_DIR / "default.yaml")
    for value in (config.data.train, config.data.test, config.data.labels):
        assert Path(value).is_file(), f"{value} not found from {tmp_path}"


def test_shipped_data_matches_the_readme_checksums():
    listed = _checksums_in_readme()
    assert set(listed) == {f"eurlex57k-small/{name}" for name in SMALL_FILES}
    assert {p.name for p in SMALL.iterdir()} == set(SMALL_FILES), "a file in data/ is not in the README"
    for name, digest in listed.items():
        actual = hashlib.sha256((ROOT / "data" / name).read_bytes()).hexdigest()
        assert actual == digest, f"data/{name} changed: update data/README.md (and say why)"


def test_shipped_data_reads_with_the_sizes_the_readme_gives():
    from xmc.data.text import read_lf_json

    labels = SMALL / "lbl.json.gz"
    train = read_lf_json(SMALL / "trn.json.gz", label_file=labels)
    test = read_lf_json(SMALL / "tst.json.gz", label_file=labels)
    assert train.Y.shape == (6000, 4271) and test.Y.shape == (1500, 4271)
    assert max(len(c) for c in train.contents + test.contents) <= 2000  # content cut to 2,000 characters


@pytest.mark.slow
def test_build_script_reproduces_the_shipped_bytes(tmp_path):
    source = shared_file("eurlex57k", "trn.json.gz").parent
    script = ROOT / "data" / "build_eurlex57k_small.py"
    subprocess.run(
        [sys.executable, str(script), "--source", str(source), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in SMALL_FILES:
        assert (tmp_path / name).read_bytes() == (SMALL / name).read_bytes(), name

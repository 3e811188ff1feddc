"""Shared by the benchmark scripts: the git revision and appending a results row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_revision() -> str:
    """Short hash of HEAD, with ``+dirty`` when the working tree has uncommitted changes."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return head + ("+dirty" if dirty.stdout.strip() else "")


def append_row(path: Path, row: dict) -> None:
    """Print ``row`` as JSON and append it to the JSON-lines file ``path``."""
    print(json.dumps(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")

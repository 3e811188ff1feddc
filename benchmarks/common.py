"""Shared by the benchmark scripts: the git revision and appending a results row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_revision() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files have uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def append_row(path: Path, row: dict) -> None:
    """Print ``row`` as JSON and append it to the JSON-lines file ``path``."""
    print(json.dumps(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")

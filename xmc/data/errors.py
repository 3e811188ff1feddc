"""The one exception every reader raises for malformed input."""

from __future__ import annotations

import os


class FormatError(ValueError):
    """A malformed input file.

    The message names the file, the 1-based line of the file (a header, where the format has one,
    is line 1) and what is wrong. Attributes ``path``, ``line`` (``None`` when the problem is not on
    one line) and ``problem`` carry the same facts for programs.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")

"""When to draw progress bars: only on a terminal.

Redirected to a file or a pipe (a batch job's log), a tqdm bar writes every refresh as a line of
carriage returns; long work logs a few plain lines there instead (see :mod:`xmc.train.loop`).
"""

from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Whether stderr, where bars and logs go, is a terminal."""
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def bars(progress: bool) -> bool:
    """Whether to draw a bar: asked for (``progress``) and on a terminal."""
    return progress and on_terminal()

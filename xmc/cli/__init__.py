"""The ``xmc`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser whose
``func`` default is the handler ``func(args) -> int``. User mistakes (bad files, bad options) raise
:class:`UsageError` or ``xmc.data.FormatError`` and are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from xmc import __version__


class UsageError(Exception):
    """A mistake in how the command was called; the message names the problem and the fix."""


def build_parser() -> argparse.ArgumentParser:
    from xmc.cli import compress, data, embed, evaluate, export, memory, predict, train

    parser = argparse.ArgumentParser(
        prog="xmc",
        description="Extreme multi-label classification: data tools, training, prediction and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"xmc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, predict, export, evaluate, data, embed, memory, compress):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from xmc.data import FormatError
    from xmc.train.loop import TrainingError

    try:
        return int(args.func(args) or 0)
    except (UsageError, FormatError, FileNotFoundError, ValueError, TrainingError) as err:
        if args.verbose and not isinstance(err, (UsageError, FormatError)):
            raise
        print(f"xmc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

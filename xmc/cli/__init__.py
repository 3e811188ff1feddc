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
from xmc.cli.errors import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from xmc.cli import compress_encoder, data, embed, evaluate, export, memory, predict, train

    parser = argparse.ArgumentParser(
        prog="xmc",
        description="Extreme multi-label classification: data tools, training, prediction and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"xmc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, predict, export, evaluate, data, embed, memory, compress_encoder):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
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
    except OSError as err:  # a folder given for a file, a read-only or full disk, ...
        if args.verbose:
            raise
        print(f"xmc {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand anywhere among a subcommand's options."""
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides"):
        extra = [a for a in rest if "=" in a and not a.startswith("-")]
        args.overrides = [*args.overrides, *extra]
        rest = [a for a in rest if a not in extra]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system error: the path, what went wrong, and what to do."""
    import errno

    path = err.filename if err.filename is not None else ""
    what = err.strerror or str(err)
    fixes = {
        errno.EISDIR: "a folder was given where a file is expected: name the file",
        errno.ENOTDIR: "a file was given where a folder is expected: name a folder",
        errno.EACCES: "no permission: choose a folder you can write (e.g. --run-dir) or fix its permissions",
        errno.EPERM: "no permission: choose a folder you can write (e.g. --run-dir) or fix its permissions",
        errno.EROFS: "the file system is read-only: choose another folder (e.g. --run-dir)",
        errno.ENOSPC: "the disk is full: free space or choose a folder on another disk; "
        "a run continues from its last checkpoint with --resume",
    }
    fix = fixes.get(err.errno)
    text = f"{path}: {what}" if path else what
    return f"{text} ({fix})" if fix else text


if __name__ == "__main__":
    sys.exit(main())

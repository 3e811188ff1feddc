"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

from xmc.data import FORMATS


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="input format (default: guessed from the name and header)",
    )
    parser.add_argument(
        "--labels",
        help="label file: lbl.json(.gz) for LF JSON lines (fixes the label count), or the label vocabulary "
        "(one name per line) for texts/labels pairs",
    )

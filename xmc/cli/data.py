"""``xmc data``: inspect, convert and synthesize datasets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from xmc.cli import data_convert, data_info, data_synth

    parser = sub.add_parser("data", help="inspect, convert and synthesize datasets", description=__doc__)
    group = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    for module in (data_info, data_convert, data_synth):
        module.register(group)

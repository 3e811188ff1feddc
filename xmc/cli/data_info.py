"""``xmc data info``: sizes and label statistics of a dataset file."""

from __future__ import annotations

import argparse
import json

from xmc.cli.common import add_format_arguments


def register(group: argparse._SubParsersAction) -> None:
    parser = group.add_parser(
        "info",
        help="points, features, labels and label-frequency statistics of a dataset file",
        description="Print the size of a dataset split and how its labels are distributed: labels per "
        "point, points per label, and (with --train) the labels that have no training point.",
    )
    parser.add_argument("path", help="dataset file (bow, LF JSON lines) or an 'X,Y' / 'texts,labels' pair")
    parser.add_argument("--train", help="the training split, to count labels without training points")
    add_format_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmc.data import load_split
    from xmc.data.summary import format_summary, summarize

    X, Y, fmt = load_split(args.path, args.format, args.labels)
    Y_train = load_split(args.train, args.format, args.labels)[1] if args.train else None
    info = summarize(Y, X, Y_train)
    if args.json:
        print(json.dumps({"path": args.path, "format": fmt, **info}, indent=2))
    else:
        print(f"{args.path} ({fmt})")
        print(format_summary(info))
    return 0

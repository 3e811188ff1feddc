"""``xmc data convert``: rewrite a dataset split in another repository format."""

from __future__ import annotations

import argparse
import os

from xmc.cli.common import add_format_arguments
from xmc.cli.errors import UsageError

_FEATURE_FORMATS = ("bow", "split")
_TEXT_FORMATS = ("lf-json", "text")


def register(group: argparse._SubParsersAction) -> None:
    parser = group.add_parser(
        "convert",
        help="convert a split between bow <-> split and lf-json <-> texts/labels pairs",
        description="Convert one dataset split. Feature formats (bow, split) convert into each other and "
        "raw-text formats (lf-json, text) into each other; two-file formats are written 'FIRST,SECOND' "
        "(e.g. trn_X_Xf.txt,trn_X_Y.txt or train_texts.txt,train_labels.txt).",
    )
    parser.add_argument("input", help="input file or 'FIRST,SECOND' pair")
    parser.add_argument("output", help="output file or 'FIRST,SECOND' pair")
    parser.add_argument("--to", required=True, choices=_FEATURE_FORMATS + _TEXT_FORMATS, help="output format")
    add_format_arguments(parser)
    parser.add_argument(
        "--out-labels",
        help="text -> lf-json: where to write the label file (default: lbl.json.gz beside the output)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmc.data import (
        detect_format,
        label_vocabulary,
        load_split,
        read_label_names,
        read_lf_json,
        read_text_pairs,
        split_pair,
        write_bow,
        write_label_names,
        write_lf_json,
        write_split,
        write_text_pairs,
    )

    source = detect_format(args.input) if args.format == "auto" else args.format
    kinds = {source in _FEATURE_FORMATS, args.to in _FEATURE_FORMATS}
    if len(kinds) == 2:
        raise UsageError(
            f"cannot convert {source} into {args.to}: feature formats (bow, split) and raw-text formats "
            "(lf-json, text) do not convert into each other"
        )
    out_pair = split_pair(args.output)
    if args.to in ("split", "text") and out_pair is None:
        raise UsageError(f"the {args.to} format is written as two files: pass OUTPUT as 'FIRST,SECOND'")
    if args.to in _FEATURE_FORMATS:
        X, Y, _ = load_split(args.input, source, args.labels)
        if args.to == "bow":
            write_bow(args.output, X, Y)
        else:
            write_split(*out_pair, X, Y)
        print(f"wrote {X.shape[0]:,} rows ({args.to}) to {args.output}")
        return 0

    if source == "lf-json":
        dataset = read_lf_json(args.input, label_file=args.labels)
        # Names in a labels file must hold no whitespace: use the label uids, or the ids themselves.
        names = read_label_names(args.labels, field="uid") if args.labels else None
    else:
        pair = split_pair(args.input)
        if pair is None:
            raise UsageError("the text format is read from two files: pass INPUT as 'texts.txt,labels.txt'")
        names = label_vocabulary([pair[1]], args.labels)
        dataset = read_text_pairs(pair[0], pair[1], names, args.labels)
    if names is None:
        names = [str(i) for i in range(dataset.Y.shape[1])]
    if args.to == "text":
        write_text_pairs(*out_pair, dataset, names)
    else:
        write_lf_json(args.output, dataset)
        label_path = args.out_labels or os.path.join(os.path.dirname(args.output) or ".", "lbl.json.gz")
        write_label_names(label_path, names)
        print(f"wrote the {len(names):,} label names to {label_path}")
    print(f"wrote {len(dataset):,} documents ({args.to}) to {args.output}")
    return 0

"""``xmc predict``: top-k labels of a trained run for a dataset file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict",
        help="predict the top-k labels of documents with a trained run",
        description="Write the top-k labels of every document of INPUT (any format the run's encoder "
        "reads) as a prediction file (.npz: indices int32 (N, k), scores float32 (N, k)); when INPUT "
        "carries labels, also print the metrics.",
    )
    parser.add_argument("--run", required=True, help="the run folder written by xmc train")
    parser.add_argument("--input", required=True, help="documents: a file or 'FIRST,SECOND' pair")
    parser.add_argument("--format", default=None, help="input format (default: the run's data.format)")
    parser.add_argument("--labels", help="label file for LF JSON / text inputs (default: the run's)")
    parser.add_argument("--k", type=int, default=100, help="labels per document (default 100)")
    parser.add_argument("--out", default="predictions.npz", help="prediction file (default predictions.npz)")
    parser.add_argument("--names", help="also write a TSV of label names and scores per document here")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmc.cli.errors import UsageError
    from xmc.data.atomic import atomic_open
    from xmc.inference.files import save_predictions
    from xmc.inference.predictor import load
    from xmc.metrics import format_table
    from xmc.train.data import read_source

    if args.k < 1:
        raise UsageError("--k must be at least 1")
    predictor = load(args.run, args.device)
    data_config = predictor.config.data
    fmt = args.format or data_config.format
    if fmt == "auto":
        from xmc.data import detect_format

        fmt = "features" if args.input.split(",")[0].endswith(".npy") else detect_format(args.input)
    labels = args.labels or data_config.labels
    source, Y = read_source(fmt, args.input, data_config, predictor.label_names, labels)
    k = predictor.width(args.k)
    if k < args.k:
        print(f"--k {args.k} is more than the model's {k:,} labels: ranking all of them")
    scores, ids = predictor.topk(predictor.inputs(source, progress=True), k)
    save_predictions(args.out, scores, ids)
    print(f"wrote the top {k} labels of {len(ids):,} documents to {args.out}")
    if args.names:
        with atomic_open(args.names) as handle:
            for srow, irow in zip(scores, ids, strict=True):
                cells = [
                    f"{predictor.label_name(int(i))}:{s:.4g}"
                    for s, i in zip(srow, irow, strict=True)
                    if i >= 0
                ]
                handle.write(("\t".join(cells) + "\n").encode())
        print(f"wrote label names to {args.names}")
    if Y is not None and Y.nnz:
        from xmc.metrics import evaluate

        if Y.shape[1] != predictor.card["num_labels"]:
            raise UsageError(f"{args.input} has {Y.shape[1]} labels, the run {predictor.card['num_labels']}")
        ks = tuple(j for j in (1, 3, 5) if j <= k)  # P@5 needs five predictions a row
        print(format_table(evaluate(Y, ids, ks=ks)))
    return 0

"""``xmc evaluate``: score a top-k prediction file against the true labels."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from xmc.cli.errors import UsageError

if TYPE_CHECKING:  # scipy is imported only when the command runs, to keep `xmc --help` quick
    import scipy.sparse as sp

_DESCRIPTION = """\
Score a prediction file (.npz with 'indices' and 'scores', as written by 'xmc predict') against the
true labels of the same split, row by row. Prints P@k, nDCG@k, R@k (recall) and RP@k (R-precision)
in percent, averaged over all rows (a row without labels scores 0). With --train it also prints the
propensity-scored PSP@k and PSnDCG@k, label coverage C@k, and P@k split into head / torso / tail
labels (three groups holding about a third of the training label occurrences each).
Several --pred (files or run folders, whose predictions.npz is read) are scored one after the other;
--plot draws them side by side: P@k by label-frequency decile (needs --train) and, for runs whose
metrics.json is found (a run folder, or beside the file), the training loss and dev P@1 per epoch.
"""

_EPILOG = """\
examples:
  xmc evaluate --pred predictions.npz --true bibtex/test.txt --train bibtex/train.txt
  xmc evaluate --pred p.npz --true tst.json.gz --labels lbl.json.gz --exclude filter_labels_test.txt \\
      --train trn.json.gz --propensity amazon --json metrics.json
  xmc evaluate --pred runs/sparse runs/dense --true tst.json.gz --labels lbl.json.gz \
      --train trn.json.gz --plot compare.png

propensity presets (A, B): wikipedia 0.5,0.4; amazon 0.6,2.6; other 0.55,1.5 (the default).
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="precision@k, nDCG@k and propensity-scored metrics of a prediction file",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pred",
        required=True,
        nargs="+",
        metavar="P.npz|RUN_DIR",
        help="prediction file(s) (.npz), or run folder(s) holding predictions.npz",
    )
    parser.add_argument(
        "--true",
        required=True,
        metavar="FILE",
        help="true labels: a bag-of-words file, an 'X,Y' split pair or lone labels file, an LF JSON "
        "lines file, or a 'texts,labels' pair",
    )
    parser.add_argument(
        "--true-format",
        default="auto",
        choices=("auto", "bow", "split", "lf-json", "text"),
        help="format of --true and --train (default: guessed from the name and header)",
    )
    parser.add_argument(
        "--labels",
        metavar="LBL_FILE",
        help="label file fixing the label count: lbl.json(.gz) for LF JSON lines, the label vocabulary "
        "for texts/labels pairs",
    )
    parser.add_argument(
        "--train",
        metavar="FILE",
        help="training split (same format as --true): enables PSP@k, PSnDCG@k, coverage and head/torso/tail",
    )
    parser.add_argument(
        "--propensity",
        metavar="PRESET|A,B",
        help="propensity parameters: wikipedia, amazon, other (default) or two numbers 'A,B'; needs --train",
    )
    parser.add_argument(
        "--exclude",
        metavar="FILTER_FILE",
        help="'doc_id label_id' pairs (an LF set's filter_labels file) removed from predictions and truth",
    )
    parser.add_argument(
        "--ks",
        default="1,3,5",
        metavar="K1,K2,...",
        help="comma-separated ranks to evaluate (default: 1,3,5)",
    )
    parser.add_argument("--json", metavar="OUT.json", help="also write the metrics (fractions) as JSON")
    parser.add_argument(
        "--plot",
        metavar="OUT.png",
        help="draw P@k by label-frequency decile (needs --train) and the runs' training curves (needs "
        "matplotlib: the [plot] extra)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xmc import metrics
    from xmc.data import read_filter_labels
    from xmc.data.atomic import atomic_open

    ks = _parse_ks(args.ks)
    if args.propensity is not None and args.train is None:
        raise UsageError("--propensity needs --train (propensities come from training label counts)")
    A, B = _parse_propensity(args.propensity or "other")
    preds = [_prediction_file(Path(p)) for p in args.pred]
    Y_true = _load_labels(args.true, args)
    num_rows, num_labels = Y_true.shape
    exclude = read_filter_labels(args.exclude, num_rows, num_labels) if args.exclude else None

    Y_train = inv_prop = None
    if args.train is not None:
        Y_train = _load_labels(args.train, args)
        if Y_train.shape[1] != num_labels:
            raise UsageError(
                f"{args.train} has {Y_train.shape[1]} labels but {args.true} has {num_labels} "
                "(pass --labels to fix the label count)"
            )
        inv_prop = metrics.inv_propensity(Y_train, A, B)
    everything, pictures = {}, []
    for path in preds:
        topk = _load_topk(path, args, ks, num_rows, num_labels)
        try:
            results = metrics.evaluate(Y_true, topk, inv_prop, ks=ks, exclude=exclude)
            if Y_train is not None:
                results.update(metrics.coverage(Y_true, topk, ks=ks, exclude=exclude))
                results.update(metrics.precision_by_frequency(Y_true, topk, Y_train, ks=ks, exclude=exclude))
        except ValueError as err:  # e.g. a prediction row that repeats a label
            raise UsageError(f"{path}: {err}") from None
        print(f"{path}: {num_rows} rows, {num_labels} labels (metrics in %)")
        print(metrics.format_table(results))
        everything[str(path)] = results
        if args.plot:
            pictures.append(_picture(path, Y_true, topk, Y_train, ks, exclude))
    if args.json:
        out = everything[str(preds[0])] if len(preds) == 1 else everything
        with atomic_open(args.json) as handle:
            handle.write((json.dumps(out, indent=2) + "\n").encode())
    if args.plot:
        from xmc.plots import plot_runs

        names = [p.name for p in pictures]
        for picture, path in zip(pictures, preds, strict=True):
            if names.count(picture.name) > 1:  # e.g. two runs/*/predictions.npz of the same folder name
                picture.name = str(path)

        try:
            plot_runs(pictures, args.plot, k=5 if 5 in ks else max(ks))
        except ValueError as err:  # matplotlib missing, or nothing to draw
            raise UsageError(f"--plot: {err}") from None
        print(f"plot: {args.plot}")
    return 0


def _prediction_file(path):
    """``path`` itself, or a run folder's ``predictions.npz``."""
    if path.is_dir():
        if not (path / "predictions.npz").is_file():
            raise UsageError(
                f"{path} is a folder without predictions.npz: pass a prediction file or a run folder"
            )
        return path / "predictions.npz"
    return path


def _load_topk(path, args, ks, num_rows: int, num_labels: int):
    from xmc.inference.files import load_predictions

    try:
        _, topk = load_predictions(path)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if topk.shape[0] != num_rows:
        raise UsageError(
            f"{path} has {topk.shape[0]} rows but {args.true} has {num_rows}: not the same split?"
        )
    if topk.shape[1] < max(ks):
        raise UsageError(f"{path} holds the top {topk.shape[1]} per row; --ks asks for k={max(ks)}")
    if topk.size and topk.max() >= num_labels:
        raise UsageError(
            f"{path} predicts label {topk.max()} but {args.true} has {num_labels} labels "
            "(pass --labels to fix the label count)"
        )
    return topk


def _picture(path, Y_true, topk, Y_train, ks, exclude):
    """A :class:`xmc.plots.RunPicture` of one prediction file: deciles (with training labels) and the
    history of the ``metrics.json`` beside it (a run folder's)."""
    from xmc.plots import RunPicture, decile_precision

    history = []
    if (path.parent / "metrics.json").is_file():
        history = json.loads((path.parent / "metrics.json").read_text()).get("history", [])
    name = path.parent.name if path.name == "predictions.npz" else path.stem
    deciles = None if Y_train is None else decile_precision(Y_true, topk, Y_train, ks, exclude)
    return RunPicture(name, deciles, history)


def _load_labels(path: str, args: argparse.Namespace) -> sp.csr_matrix:
    """``xmc.data.load_labels`` with its plain ``ValueError`` (a format that does not fit the path) as
    a usage error; ``FormatError`` (a malformed file) passes through to the CLI's handler."""
    from xmc.data import FormatError, load_labels

    try:
        return load_labels(path, format=args.true_format, labels_file=args.labels)
    except FormatError:
        raise
    except ValueError as err:
        raise UsageError(f"{path}: {err}") from None


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--ks {text!r}: expected comma-separated positive integers, e.g. 1,3,5") from None
    if min(ks) < 1:
        raise UsageError(f"--ks {text!r}: ranks must be positive")
    return ks


def _parse_propensity(text: str) -> tuple[float, float]:
    from xmc.metrics import PROPENSITY_PRESETS

    if text in PROPENSITY_PRESETS:
        return PROPENSITY_PRESETS[text]
    parts = text.split(",")
    try:
        A, B = (float(part) for part in parts)
    except ValueError:
        presets = ", ".join(PROPENSITY_PRESETS)
        raise UsageError(f"--propensity {text!r}: expected one of {presets} or two numbers 'A,B'") from None
    return A, B

"""``xmc data synth``: write a synthetic XMC dataset with power-law label frequencies and a planted,
learnable signal (for scale tests of readers, training and memory use)."""

from __future__ import annotations

import argparse

from xmc.cli.errors import UsageError
from xmc.data.synth import SYNTH_FORMATS, SynthOptions, synthesize

_DEFAULTS = SynthOptions()

# SynthOptions field -> the flag a user typed, so validation errors name the flag.
_FLAGS = {
    "num_labels": "--labels",
    "num_train": "--train",
    "num_test": "--test",
    "labels_per_doc": "--labels-per-doc",
    "exponent": "--exponent",
    "num_features": "--features",
    "seed": "--seed",
    "format": "--format",
    "signature_size": "--signature-size",
    "words_per_label": "--words-per-label",
    "noise_words": "--noise-words",
}

_EPILOG = """\
Label r (by frequency rank) joins each document with probability c * r^-a, c chosen so that
documents carry --labels-per-doc labels on average; so the expected count of rank r falls as
r^-a. This needs c <= 1: a large m with a steep exponent over few labels is impossible and is
refused with the largest m and a that would work. Label ids are a seeded shuffle of the ranks.

Each label has a signature of --signature-size word ids; a document holds --words-per-label words
from the signature of each of its labels plus about --noise-words background words (Zipf over the
vocabulary). Bag-of-words values are 1 + log(count), L2-normalized per document; LF JSON text
spells the same words as "w123".

Files: bow -> train.txt, test.txt; lf-json -> trn.json.gz, tst.json.gz, lbl.json.gz; both -> all
five (the same documents). synth.json records the options. The same options and seed give
byte-identical files.

example:
  xmc data synth --out /tmp/synth-1m --labels 1000000 --train 100000 --test 20000 \\
      --labels-per-doc 5 --exponent 0.8 --features 1000 --noise-words 2
"""


def register(group: argparse._SubParsersAction) -> None:
    """Add ``synth`` to the subparsers of ``xmc data``."""
    d = _DEFAULTS
    parser = group.add_parser(
        "synth",
        help="write a synthetic dataset (power-law labels, learnable signal) for scale tests",
        description="Write a synthetic XMC dataset with power-law label frequencies and a planted, "
        "learnable signal, for scale tests of readers, training and memory use.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument(
        "--labels",
        type=int,
        default=d.num_labels,
        metavar="L",
        help=f"number of labels; millions are fine, memory grows as O(L) (default {d.num_labels})",
    )
    parser.add_argument(
        "--train",
        type=int,
        default=d.num_train,
        metavar="N",
        help=f"training documents; time and file size grow linearly (default {d.num_train})",
    )
    parser.add_argument(
        "--test",
        type=int,
        default=d.num_test,
        metavar="M",
        help=f"test documents, same distribution; 0 writes no test file (default {d.num_test})",
    )
    parser.add_argument(
        "--labels-per-doc",
        type=float,
        default=d.labels_per_doc,
        metavar="m",
        help="mean labels per document (some documents get none); larger needs a smaller exponent "
        f"or more labels (default {d.labels_per_doc:g})",
    )
    parser.add_argument(
        "--exponent",
        type=float,
        default=d.exponent,
        metavar="a",
        help="power-law exponent of label count vs frequency rank; larger = a few very frequent labels "
        f"and a longer tail of rare ones (default {d.exponent:g})",
    )
    parser.add_argument(
        "--features",
        type=int,
        default=d.num_features,
        metavar="F",
        help="feature / vocabulary size; smaller = more labels share signature words, a harder task "
        f"(default {d.num_features})",
    )
    parser.add_argument(
        "--format",
        choices=SYNTH_FORMATS,
        default=d.format,
        help=f"bag-of-words, LF JSON lines, or both (default {d.format})",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed, >= 0 (default {d.seed})")
    parser.add_argument(
        "--signature-size",
        type=int,
        default=d.signature_size,
        metavar="s",
        help=f"words per label signature; smaller = each label easier to spot (default {d.signature_size})",
    )
    parser.add_argument(
        "--words-per-label",
        type=int,
        default=d.words_per_label,
        metavar="k",
        help="signature words drawn per (document, label); more = stronger signal, bigger files "
        f"(default {d.words_per_label})",
    )
    parser.add_argument(
        "--noise-words",
        type=float,
        default=d.noise_words,
        metavar="W",
        help="mean background words per document; more = weaker signal, bigger files "
        f"(default {d.noise_words:g})",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (off anyway without a TTY)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the options (errors name the flag), write the dataset, print one summary line."""
    options = SynthOptions(
        num_labels=args.labels,
        num_train=args.train,
        num_test=args.test,
        labels_per_doc=args.labels_per_doc,
        exponent=args.exponent,
        num_features=args.features,
        seed=args.seed,
        format=args.format,
        signature_size=args.signature_size,
        words_per_label=args.words_per_label,
        noise_words=args.noise_words,
    )
    try:
        options.validate(_FLAGS)
    except ValueError as err:
        raise UsageError(str(err)) from None
    result = synthesize(args.out, options, progress=not args.no_progress)
    train_mean = result.label_assignments["train"] / max(result.documents["train"], 1)
    print(
        f"wrote {', '.join(result.files)} to {result.out}: {options.num_labels:,} labels, "
        f"{result.documents['train']:,} train / {result.documents['test']:,} test documents, "
        f"{train_mean:.3f} labels per train document (top label in {result.max_probability:.1%}) "
        f"in {result.seconds:.1f} s"
    )
    return 0

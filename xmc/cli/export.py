"""``xmc export``: write a run's condensed form (fixed fan-in layers as values + ids) for CPU prediction."""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Write the best model of a run whose classifier is fixed fan-in as a condensed folder: each sparse layer
as its values and ids (and, after SRigL ablation, the surviving neurons), the encoder as trained.
`xmc predict --run OUT` and `xmc.load(OUT)` read it and predict on the CPU without the training stack
(no optimizer state, no Triton), label chunk by label chunk, in bounded memory.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="condense a fixed fan-in run (values + ids) for fast CPU prediction",
        description=_DESCRIPTION,
        epilog="example:\n  xmc export --run runs/eurlex --out models/eurlex-condensed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="the run folder written by xmc train")
    parser.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmc.inference.export import export_condensed

    sizes = export_condensed(args.run, args.out)
    parts = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in sizes.items())
    print(f"wrote {args.out}: {parts}")
    return 0

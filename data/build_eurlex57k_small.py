"""Build ``data/eurlex57k-small/``, the small real dataset the default command trains on.

A seeded subset of EURLEX57K (Chalkidis et al., ACL 2019; CC BY-SA 4.0) in the LF JSON lines format
(``uid``, ``title``, ``content``, ``target_ind``):

- ``trn.json.gz``: ``--train`` documents sampled without replacement from the source's train split;
- ``tst.json.gz``: ``--test`` documents sampled from the source's *dev* split (our held-out split: the
  official EURLEX57K test split is kept back for independent evaluation);
- ``lbl.json.gz``: the source's label file copied byte for byte (all 4,271 EuroVoc concepts), so the ids
  in ``target_ind`` stay valid.

``content`` is cut to its first ``--max-chars`` characters (2,000 by default) to keep the shipped files
small; ``title`` and ``target_ind`` are kept as they are. Sampled documents keep their source order.
The output is byte-reproducible: a fixed seed, JSON written with a fixed key order, and gzip headers
without a file name or time stamp (mtime 0).

    python data/build_eurlex57k_small.py                    # reads ../shared/data/eurlex57k
    python data/build_eurlex57k_small.py --source DIR --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = Path(os.environ.get("XMC_SHARED_DATA", HERE.parents[1] / "shared" / "data")) / "eurlex57k"


def read_records(path: Path) -> list[dict]:
    """All JSON records of a gzip JSON lines file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sample(records: list[dict], count: int, rng: np.random.Generator, name: str) -> list[dict]:
    """``count`` records drawn without replacement, returned in their source order."""
    if count > len(records):
        raise SystemExit(f"asked for {count} {name} documents but the source has only {len(records)}")
    chosen = np.sort(rng.choice(len(records), size=count, replace=False))
    return [records[i] for i in chosen]


def write_records(path: Path, records: list[dict], max_chars: int) -> None:
    """Write LF JSON lines, gzip with no name and mtime 0 so equal input gives equal bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        for record in records:
            out = {
                "uid": record["uid"],
                "title": record["title"],
                "content": record["content"][:max_chars],
                "target_ind": record["target_ind"],
            }
            handle.write((json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with trn/dev/lbl.json.gz")
    parser.add_argument("--out", type=Path, default=HERE / "eurlex57k-small", help="output folder")
    parser.add_argument("--train", type=int, default=6000, help="training documents (from the train split)")
    parser.add_argument("--test", type=int, default=1500, help="test documents (from the dev split)")
    parser.add_argument("--max-chars", type=int, default=2000, help="keep this many characters of content")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    for name in ("trn.json.gz", "dev.json.gz", "lbl.json.gz"):
        if not (args.source / name).exists():
            raise SystemExit(f"{args.source / name} not found: pass --source FOLDER with EURLEX57K's files")
    rng = np.random.default_rng(args.seed)
    train = sample(read_records(args.source / "trn.json.gz"), args.train, rng, "train")
    test = sample(read_records(args.source / "dev.json.gz"), args.test, rng, "dev")

    args.out.mkdir(parents=True, exist_ok=True)
    write_records(args.out / "trn.json.gz", train, args.max_chars)
    write_records(args.out / "tst.json.gz", test, args.max_chars)
    shutil.copyfile(args.source / "lbl.json.gz", args.out / "lbl.json.gz")

    for name, records in (("trn.json.gz", train), ("tst.json.gz", test)):
        per_doc = np.array([len(r["target_ind"]) for r in records])
        used = len({i for r in records for i in r["target_ind"]})
        size = (args.out / name).stat().st_size
        print(
            f"{name}: {len(records)} documents, {used} labels used, "
            f"{per_doc.mean():.2f} labels per document, {size:,} bytes"
        )
    print(f"lbl.json.gz: {(args.out / 'lbl.json.gz').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

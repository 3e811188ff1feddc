"""``xmc embed``: embed documents with a transformer and write the vectors to a ``.npy`` file."""

from __future__ import annotations

import argparse
import logging
import os

from xmc.cli.errors import UsageError

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Embed every document of a file with a transformer (eval mode, no gradients) and write an (N, hidden)
array to a .npy file, row i for document i. The input is LF JSON lines (.json / .json.gz; the
--fields are joined by a newline) or a plain text file with one document per line (e.g. a
*_texts.txt file). The result trains a classifier on fixed features: data.format=features,
encoder.type=features. Models load from local files only; nothing is downloaded.
"""

_EPILOG = """\
examples:
  xmc embed --input trn.json.gz --out trn_minilm.npy
  xmc embed --input train_texts.txt --out train.npy --encoder ./my-bert --pooling cls --dtype float32
"""

_FIELDS = ("title", "content")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed",
        help="embed documents with a transformer into a .npy file of features",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input", required=True, metavar="FILE", help="LF JSON lines, or one document per line"
    )
    parser.add_argument("--out", required=True, metavar="FILE.npy", help="where to write the embeddings")
    parser.add_argument(
        "--encoder",
        default="minilm",
        metavar="minilm|PATH",
        help="'minilm' (the bundled MiniLM-L6, 384 dims) or a local model folder saved with "
        "save_pretrained (default: minilm)",
    )
    parser.add_argument("--pooling", default="mean", choices=("mean", "cls"), help="default: mean")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document (default: 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="documents per batch (default: 64)")
    parser.add_argument(
        "--fields",
        default="title,content",
        help="LF JSON fields to embed, comma-separated (default: title,content)",
    )
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="default: float16")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.set_defaults(func=run)


def read_documents(path: str, fields: list[str]) -> list[str]:
    """The documents of ``path``: LF JSON records' ``fields`` joined by newlines, or the file's lines.

    JSON records need no labels here; a line that is not a JSON object raises ``FormatError``.
    """
    from xmc.data import FormatError
    from xmc.data.text import decode_lines, json_records

    if not path.endswith((".json", ".json.gz")):
        return decode_lines(path)
    documents = []
    for number, record in json_records(path):
        parts = [record.get(f, "") for f in fields]
        if not all(isinstance(p, str) for p in parts):
            raise FormatError(path, number, f"fields {', '.join(fields)} must be strings")
        documents.append("\n".join(p for p in parts if p))
    return documents


def parse_fields(text: str) -> list[str]:
    """``--fields``: a comma-separated subset of the LF JSON text fields, or a UsageError."""
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields or any(f not in _FIELDS for f in fields):
        raise UsageError(f"--fields takes a comma-separated subset of {', '.join(_FIELDS)}, got {text!r}")
    return fields


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from xmc.data.atomic import atomic_open
    from xmc.data.source import SplitSource
    from xmc.encoders import (
        TransformerEncoder,
        build_token_inputs,
        encode_all,
        load_tokenizer,
        resolve_model_path,
    )
    from xmc.runtime import resolve_device

    fields = parse_fields(args.fields)
    if args.max_length < 2 or args.batch_size < 1:
        raise UsageError("--max-length must be at least 2 and --batch-size at least 1")
    if not os.path.exists(args.input):
        raise UsageError(f"--input {args.input}: no such file")
    path = resolve_model_path(args.encoder)  # FileNotFoundError: one line, exit code 2
    device = resolve_device(args.device, "--device")  # ValueError: one line, exit code 2
    encoder = TransformerEncoder.from_pretrained(path, pooling=args.pooling)
    limit = encoder.max_positions
    if limit is not None and args.max_length > limit:
        raise UsageError(f"--max-length {args.max_length} exceeds the model's {limit} positions")
    is_json = args.input.endswith((".json", ".json.gz"))
    # Read lazily: on a tokenized-cache hit the file is not parsed again.
    split = SplitSource(
        texts=lambda: read_documents(args.input, fields),
        sources=[args.input],
        variant=f"embed|json={is_json}|{','.join(fields) if is_json else ''}",
    )
    inputs = build_token_inputs(split, load_tokenizer(path), args.max_length)
    # Longest documents first: batches of similar length pad little, and a memory error shows early.
    order = np.argsort(-inputs.lengths(), kind="stable")
    vectors = encode_all(
        encoder.to(device), inputs, args.batch_size, device, order=order, dtype=np.dtype(args.dtype)
    )
    with atomic_open(args.out) as handle:
        np.save(handle, vectors)
    log.info("wrote %d x %d embeddings to %s", *vectors.shape, args.out)
    return 0

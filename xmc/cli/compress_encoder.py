"""``xmc compress-encoder``: shrink a transformer encoder's MLPs by fine-grained parameter sharing (FiPS)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from xmc.cli.errors import UsageError

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Compress the MLP (feed-forward) weights of a transformer encoder with FiPS: the blocks are grouped
(--group-size consecutive blocks), each group's MLP weights share one dense base U (D x r) and every
weight keeps a sparse factor V (r x I, exactly --sparsity zeros), initialized by SVD and fitted by Adam
with gradual magnitude pruning to reproduce each block's MLP output on activations cached from training
documents. --budget is the fraction of the original MLP weights kept (biases excluded), which fixes r.

The encoder comes from a local model folder / 'minilm' (--encoder, with --data giving training documents)
or from a finished `xmc train` run (--run: its fine-tuned encoder and, unless --data is given, its
training texts). The result is a model folder usable wherever an encoder is:
encoder.name_or_path=OUT for `xmc train`, --encoder OUT for `xmc embed` and `xmc memory`. With --run,
--finetune-epochs N then trains the run's config end to end (XMC loss) with the compressed encoder,
keeping the compressed parameters, into OUT/finetune, and writes the fine-tuned encoder back into OUT.
"""

_EPILOG = """\
examples:
  xmc compress-encoder --method fips --encoder minilm --data trn.json.gz --budget 0.5 --out mini-50
  xmc compress-encoder --run runs/a --budget 0.25 --sparsity 0.5 --out runs/a-fips --finetune-epochs 2
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compress-encoder",
        help="compress a transformer encoder's MLPs (FiPS) into a new model folder",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--method", default="fips", choices=("fips",), help="default: fips")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run", metavar="RUN_DIR", help="a finished xmc train run with a transformer encoder"
    )
    source.add_argument("--encoder", metavar="minilm|PATH", help="'minilm' or a local model folder")
    parser.add_argument(
        "--out", required=True, metavar="FOLDER", help="where to write the compressed encoder"
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=float, help="fraction of the original MLP weights kept, e.g. 0.5")
    size.add_argument("--rank", type=int, help="the shared base's rank r instead of a budget (1..D)")
    parser.add_argument(
        "--sparsity", type=float, default=0.5, help="zeros per factor, in [0, 1) (default 0.5)"
    )
    parser.add_argument("--group-size", type=int, default=2, help="blocks sharing one base (default: 2)")
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="training documents for the activation cache: LF JSON lines or one document per line "
        "(default with --run: the run's data.train)",
    )
    parser.add_argument("--fields", default="title,content", help="LF JSON fields (default: title,content)")
    parser.add_argument(
        "--documents", type=int, default=512, help="documents run for the cache (default 512)"
    )
    parser.add_argument("--tokens", type=int, default=16384, help="cached tokens per block (default 16384)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document (default: 128)")
    parser.add_argument(
        "--steps", type=int, default=300, help="Adam steps per group (default 300; 0: SVD only)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="with --run: train the run's config end to end with the compressed encoder (default 0: no)",
    )
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.budget is not None and args.budget <= 0:
        raise UsageError(f"--budget must be positive (a fraction of the MLP weights), got {args.budget}")
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must lie in [0, 1), got {args.sparsity}")
    for key in ("group_size", "documents", "tokens", "batch_tokens"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.steps < 0 or args.finetune_epochs < 0 or args.max_length < 2:
        raise UsageError("--steps and --finetune-epochs must be >= 0 and --max-length >= 2")
    if args.finetune_epochs and not args.run:
        raise UsageError("--finetune-epochs needs --run (its config gives the data, labels and loss)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder: choose another --out or remove it")
    if args.encoder and args.data is None:
        raise UsageError(
            "--encoder needs --data FILE: the training documents whose activations the fit matches"
        )
    if args.data is not None and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file")


def _from_folder(args: argparse.Namespace):
    """(model, tokenizer, source name) of --encoder."""
    from transformers import AutoModel

    from xmc.encoders import load_tokenizer, resolve_model_path

    path = resolve_model_path(args.encoder)  # FileNotFoundError: one line, exit code 2
    model = AutoModel.from_pretrained(str(path), local_files_only=True).float()
    if getattr(model.config, "xmc_fips", None):
        raise UsageError(f"--encoder {args.encoder} is already FiPS-compressed: compress its source instead")
    return model, load_tokenizer(path), str(path)


def _from_run(args: argparse.Namespace):
    """(model, tokenizer, source name) of --run: the run's best encoder weights."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    from xmc.config import load_config
    from xmc.encoders import load_tokenizer

    run = Path(args.run)
    for name in ("config.yaml", "best.safetensors", "encoder/config.json"):
        if not (run / name).is_file():
            raise UsageError(f"--run {run}: {name} missing; give the folder of a finished xmc train run")
    config = load_config(run / "config.yaml")
    if config.encoder.type != "transformer":
        raise UsageError(f"--run {run} trained a {config.encoder.type} encoder; FiPS compresses transformers")
    hf_config = AutoConfig.from_pretrained(str(run / "encoder"), local_files_only=True)
    if getattr(hf_config, "xmc_fips", None):
        raise UsageError(f"--run {run} already trained a FiPS-compressed encoder")
    model = AutoModel.from_config(hf_config)
    prefix = "encoder.model."
    with safe_open(str(run / "best.safetensors"), framework="pt") as handle:
        state = {k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise ValueError(
            f"{run}/best.safetensors does not hold this encoder's weights ({(missing + unexpected)[:3]})"
        )
    return model.float(), load_tokenizer(run / "encoder"), str(run)


def _documents(args: argparse.Namespace) -> list[str]:
    """Up to --documents training texts, a seeded random sample."""
    import numpy as np

    from xmc.cli.embed import parse_fields, read_documents

    if args.data is not None:
        texts = read_documents(args.data, parse_fields(args.fields))
    else:
        from xmc.config import load_config
        from xmc.data import detect_format
        from xmc.train.data import read_source

        data = load_config(Path(args.run) / "config.yaml").data
        fmt = detect_format(data.train) if data.format == "auto" else data.format
        if fmt not in ("lf-json", "text"):
            raise UsageError(f"the run's data.train holds no raw text (format {fmt}): pass --data FILE")
        texts = read_source(fmt, data.train, data, None)[0].texts()
    if not texts:
        raise UsageError("no training documents found for the activation cache")
    rng = np.random.default_rng([args.seed, 0xD0C])
    chosen = np.sort(rng.choice(len(texts), min(args.documents, len(texts)), replace=False))
    return [texts[i] for i in chosen]


def run(args: argparse.Namespace) -> int:
    from xmc.compress.fips import format_summary, save_compressed
    from xmc.compress.fit import cache_activations, compress_mlps, plan_ranks

    _check(args)
    model, tokenizer, source = _from_run(args) if args.run else _from_folder(args)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.max_length > limit:
        raise UsageError(f"--max-length {args.max_length} exceeds the model's {limit} positions")
    plan_ranks(model, args.sparsity, args.budget, args.rank, args.group_size)  # fail before the slow part
    texts = _documents(args)
    log.info("caching MLP activations of %d tokens from %d documents", args.tokens, len(texts))
    cache = cache_activations(model, tokenizer, texts, args.tokens, args.max_length, seed=args.seed)
    report = compress_mlps(
        model,
        cache,
        args.sparsity,
        budget=args.budget,
        rank=args.rank,
        group_size=args.group_size,
        steps=args.steps,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        seed=args.seed,
    )
    report["fit"].update(max_length=args.max_length, tokens=args.tokens)
    summary = save_compressed(model, tokenizer, args.out, {"source": source, **report})
    print(format_summary(summary))
    if args.finetune_epochs:
        summary = _finetune(args, tokenizer, summary)
        print(format_summary(summary))
    print(f"wrote {args.out} (use it as encoder.name_or_path={args.out})")
    return 0


def _finetune(args: argparse.Namespace, tokenizer, summary: dict) -> dict:
    """Train the run's config end to end with the compressed encoder into OUT/finetune, then write the
    fine-tuned encoder (its best checkpoint) back into OUT."""
    from safetensors import safe_open

    from xmc.compress.fips import save_compressed
    from xmc.config import load_config
    from xmc.encoders import TransformerEncoder
    from xmc.train.run import run_training

    out = Path(args.out).resolve()
    overrides = [f"encoder.name_or_path={out}", f"train.epochs={args.finetune_epochs}"]
    config = load_config(Path(args.run) / "config.yaml", overrides)
    metrics = run_training(config, str(out / "finetune"))
    model = TransformerEncoder.from_pretrained(out).model
    prefix = "encoder.model."
    with safe_open(str(out / "finetune" / "best.safetensors"), framework="pt") as handle:
        state = {k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise ValueError(
            f"the fine-tuned checkpoint does not match the compressed encoder ({(missing + unexpected)[:3]})"
        )
    finetune = {
        "epochs": args.finetune_epochs,
        "run": str(out / "finetune"),
        "test": {k: v for k, v in metrics.get("test", {}).items() if k.startswith("P@")},
    }
    keep = {k: summary[k] for k in ("source", "fit", "reconstruction") if k in summary}
    return save_compressed(model, tokenizer, out, {**keep, "finetune": finetune})

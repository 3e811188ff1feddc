"""``xmc train``: train a model from a config (default: the shipped small EURLEX57K set)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a model (with no arguments: the shipped small EURLEX57K set)",
        description="Train, select on the dev split, predict the test split and report P@k beside the "
        "most-frequent-labels baseline. Any config key can be overridden as key=value, e.g. "
        "`xmc train classifier.type=dense train.epochs=3`.",
    )
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml of the source tree)")
    parser.add_argument("--run-dir", help="output folder (default: runs/<time>-<config name>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its checkpoint"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmc.cli.errors import UsageError
    from xmc.config import ConfigError, load_config
    from xmc.train.run import run_training

    if args.resume and not args.run_dir:
        raise UsageError("--resume needs --run-dir RUN_DIR (the folder of the run to continue)")
    config_path = args.config
    if args.resume and config_path is None:  # continue with the run's own resolved config
        from pathlib import Path

        config_path = Path(args.run_dir) / "config.yaml"
        if not config_path.exists():
            raise UsageError(f"{args.run_dir}: no run to resume here (config.yaml missing)")
    try:
        config = load_config(config_path, args.overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    run_training(
        config,
        args.run_dir,
        resume=args.resume,
        progress=not args.no_progress,
        config_name=str(config_path) if config_path else None,
    )
    return 0

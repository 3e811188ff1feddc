"""``xmc memory``: will this configuration fit my GPU, and where does the memory go?"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from xmc.cli.errors import UsageError

EPILOG = """\
examples:
  xmc memory --labels 2812281 --hidden 768 --fan-in 64 --batch 128
  xmc memory --preset amazon-3m --world-size 4
  xmc memory --preset all --plot memory.png
  xmc memory --config configs/bibtex.yaml data.train=bibtex/train.txt
  xmc memory --encoder bert-tiny --labels 200000 --intermediate 512 --batch 8 --seq-len 32 --measure

Rows are per GPU (per rank under --world-size: with --parallel labels the classifier's labels are
split across ranks and the encoder is replicated; with --parallel data everything is replicated).
A config's train.batch_size is the global batch, split across ranks. Estimates never build the model;
--measure runs real steps to check them.
"""


def register(sub) -> None:
    parser = sub.add_parser(
        "memory",
        help="estimate (or measure) the training memory of a configuration, per backend and card",
        description="Break down the memory of a training step by component for each classifier backend "
        "(dense, fixed fan-in, RPS) and list which common GPUs it fits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        help="a repository set: wiki-500k, amazon-670k, amazon-3m, "
        "lf-amazontitles-1.3m, or all (its real L and the anchors' settings)",
    )
    source.add_argument("--config", help="a training config (YAML); L and F come from its data files")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, with --config (e.g. data.train=bibtex/train.txt classifier.fan_in=16)",
    )
    parser.add_argument("--labels", type=int, help="number of labels L")
    parser.add_argument(
        "--encoder",
        help="bert-base (default), bert-large, distilbert-base, roberta-base, "
        "distilroberta-base, minilm, bert-tiny, a local model folder, bow:F or features",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        help="encoder output width (default: the encoder's own; the "
        "projection width for bow:F, the embedding width for features)",
    )
    parser.add_argument("--intermediate", type=int, help="width of a layer between encoder and classifier")
    parser.add_argument(
        "--intermediate-fan-in", type=int, help="K of a fixed fan-in intermediate layer (default: dense)"
    )
    parser.add_argument("--fan-in", type=int, help="fixed fan-in K (default 128)")
    parser.add_argument(
        "--fan-in-group", type=int, help="grouped fan-in: G labels share one id row (default 1: no groups)"
    )
    parser.add_argument(
        "--dense-head",
        type=int,
        help="the fixed fan-in row with a dense head over the N most frequent labels (default 0: none)",
    )
    parser.add_argument("--batch", type=int, help="documents per micro-batch and GPU (default 64)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per document (default 128)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (default bf16)"
    )
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), help="classifier optimizer (default adamw)")
    parser.add_argument(
        "--classifier-state",
        choices=("fp32", "bf16"),
        help="classifier weights and AdamW moments in fp32 (default) or bf16 (train.classifier_state; "
        "dense and fixed fan-in, rps keeps fp32)",
    )
    parser.add_argument(
        "--meta-clusters", type=int, help="add an auxiliary meta head over this many clusters"
    )
    parser.add_argument("--compression", type=float, help="RPS compression L*D/m (default 8)")
    parser.add_argument(
        "--world-size",
        type=int,
        help="GPUs (ranks) training together (default 1); rows are per rank. With --config or --preset "
        "the config's train.batch_size is the global batch: each rank gets its share",
    )
    parser.add_argument(
        "--parallel",
        choices=("labels", "data"),
        help="how --world-size GPUs share the work, as train.parallel: labels (the classifier split "
        "by labels; the default here, where memory is the question) or data (everything replicated)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute encoder activations in backward",
    )
    parser.add_argument("--backends", nargs="+", help="classifier backends to show (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="PNG", help="also draw a bar chart of the backends per plan")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="run real training steps of this shape "
        "(random init, synthetic data) and print the measured peak beside the estimate",
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps for --measure (default 3)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="device for --measure (default: CUDA if any)"
    )
    parser.set_defaults(func=run)


def _plans(args) -> list:
    from xmc.memory.planner import ENCODERS, PRESETS, Plan, encoder_spec, plan_from_config, preset_plan

    encoder = args.encoder  # replaces the plan's encoder, unless it only tells a bow config its F
    if args.preset:
        names = list(PRESETS) if args.preset.lower() == "all" else [args.preset]
        plans = [preset_plan(n) for n in names]
    elif args.config:
        from xmc.config import load_config

        config = load_config(args.config, args.overrides)
        features = None
        if config.encoder.type == "bow" and encoder and encoder.lower().startswith("bow:"):
            features = encoder_spec(encoder).features  # the config's own encoder, F given by hand
            encoder = None
        plans = [plan_from_config(config, args.labels, features)]
    else:
        if args.labels is None:
            raise UsageError("give --labels L (or --preset NAME, or --config FILE)")
        plans = [Plan(labels=args.labels, encoder=ENCODERS["bert-base"])]
    if args.overrides and not args.config:
        raise UsageError(f"overrides such as {args.overrides[0]!r} apply to a config: add --config FILE")
    out = []
    for plan in plans:
        changes = {
            key: value
            for key, value in {
                "labels": args.labels,
                "fan_in": args.fan_in,
                "fan_in_group": args.fan_in_group,
                "dense_head": args.dense_head,
                "batch": args.batch,
                "grad_accum": args.grad_accum,
                "seq_len": args.seq_len,
                "precision": args.precision,
                "optimizer": args.optimizer,
                "classifier_state": args.classifier_state,
                "meta_clusters": args.meta_clusters,
                "intermediate": args.intermediate,
                "intermediate_fan_in": args.intermediate_fan_in,
                "rps_compression": args.compression,
                "world_size": args.world_size,
                "parallel": args.parallel,
                "gradient_checkpointing": args.gradient_checkpointing,
            }.items()
            if value is not None
        }
        if (args.preset or args.config) and args.world_size and args.batch is None:
            changes["batch"] = -(-plan.batch // args.world_size)  # the config's batch is global
        if encoder:
            changes["encoder"] = encoder_spec(encoder, args.hidden)
        spec = changes.get("encoder", plan.encoder)
        if args.hidden is not None and args.hidden != spec.hidden:
            if spec.kind == "transformer":
                raise UsageError(
                    f"{spec.name} outputs {spec.hidden} wide, not --hidden {args.hidden}: drop --hidden, "
                    f"or add --intermediate {args.hidden} for a layer of that width before the classifier"
                )
            spec = replace(spec, hidden=args.hidden)
        changes["encoder"] = spec
        if (
            not args.config
            and "fan_in" not in changes
            and plan.fan_in > (changes.get("intermediate") or spec.hidden)
        ):
            changes["fan_in"] = max(1, (changes.get("intermediate") or spec.hidden) // 8)
        out.append(replace(plan, **changes))
    return out


def run(args) -> int:
    from xmc.memory.measure import measure
    from xmc.memory.planner import format_report, human, report
    from xmc.memory.plot import plot

    plans = _plans(args)
    names = tuple(args.backends) if args.backends else None
    reports = [report(p, names) for p in plans]
    measured = []
    if args.measure:
        if len(plans) != 1:
            raise UsageError("--measure runs one plan at a time: name one preset")
        for name in reports[0]["backends"]:
            measured.append(measure(plans[0], name, steps=args.steps, device=args.device))
    if args.json:
        payload = reports[0] if len(reports) == 1 else reports
        if measured:
            payload = {"estimate": payload, "measured": measured}
        print(json.dumps(payload, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        for m in measured:
            print(
                f"\nmeasured {m['backend']} on {m['device']} ({m['steps']} steps): "
                f"peak {human(m['measured_bytes'])} vs estimate {human(m['estimate_bytes'])} "
                f"(ratio {m['ratio']:.2f}; {m['how']})"
            )
    if args.plot:
        plot(reports, args.plot)
        if not args.json:
            print(f"\nchart written to {args.plot}")
    return 0

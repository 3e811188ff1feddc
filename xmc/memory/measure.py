"""``xmc memory --measure``: real training steps of a planned shape, and the peak memory they take.

The model is the pipeline's own (random-init encoder of the planned size, the classifier backend, the
fused optimizers of the training loop) on synthetic documents with five labels each; the peak is
``torch.cuda.max_memory_allocated`` on CUDA and the growth of the resident set on CPU, over the
baseline before the model is built.
"""

from __future__ import annotations

from dataclasses import replace

from xmc.memory.planner import Plan, estimate
from xmc.runtime import peak_memory, reset_peak_memory, resident_bytes, resolve_device


def synthetic_batch(plan: Plan, rows: int, device, generator):
    import torch

    spec = plan.encoder
    if spec.kind == "transformer":
        return {
            "input_ids": torch.randint(0, spec.vocab, (rows, plan.seq_len), generator=generator).to(device),
            "attention_mask": torch.ones(rows, plan.seq_len, dtype=torch.int64, device=device),
        }
    if spec.kind == "bow":
        per_row = min(64, spec.features)
        return {
            "bow_indices": torch.randint(0, spec.features, (rows * per_row,), generator=generator).to(device),
            "bow_offsets": torch.arange(0, rows * per_row, per_row, device=device),
            "bow_weights": torch.full((rows * per_row,), per_row**-0.5, device=device),
        }
    return {"features": torch.randn(rows, spec.hidden, generator=generator).to(device)}


def measure(plan: Plan, backend: str, steps: int = 3, device: str | None = None) -> dict:
    """Run ``steps`` real training steps of ``plan``'s shape with ``backend`` (random-init encoder of
    the planned size, synthetic documents with 5 labels each) and return the peak memory they took
    over the baseline before the model was built: ``max_memory_allocated`` on CUDA, the growth of
    the resident set on CPU. A tiny model of the same kind trains one step first, so library code
    and kernels paged in on first use are not counted as the shape's memory. Label sharding is not
    simulated: ``world_size`` must be 1."""
    import gc

    import torch

    if plan.world_size != 1:
        raise ValueError("--measure runs on one device: drop --world-size")
    dev = resolve_device(device or "auto", "--device")
    plan = replace(plan, device=dev.type, grad_accum=1)
    estimate_total = sum(estimate(plan, (backend,))[backend].values())
    spec = plan.encoder
    tiny = replace(
        plan,
        labels=min(plan.labels, 64),
        encoder=replace(
            spec,
            hidden=32,
            layers=min(spec.layers, 1),
            heads=2,
            intermediate=64,
            vocab=100,
            features=min(spec.features, 100),
            params=None,
        ),
        intermediate=32 if plan.intermediate else 0,
        meta_clusters=min(plan.meta_clusters, 4),
        fan_in=min(plan.fan_in, 8),
        batch=2,
    )
    _train_steps(tiny, backend, dev, 1)  # warm-up: pages in the code paths the real run takes
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    reset = reset_peak_memory(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else resident_bytes()[0]
    loss = _train_steps(plan, backend, dev, steps)  # with the plan's classifier state
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = peak_memory(dev)["allocated"] - base
        how = "torch.cuda.max_memory_allocated over the allocation before the model was built"
    else:
        peak = peak_memory(dev)["rss"] - base
        how = "peak resident set (VmHWM) over the resident set before the model was built"
        if not reset:
            how += " (the peak could not be reset: it may include earlier peaks of this process)"
    if estimate_total < 256 * 2**20:
        how += "; at this size allocator reuse and page granularity dominate: measure larger shapes"
    return {
        "backend": backend,
        "device": str(dev),
        "steps": steps,
        "estimate_bytes": estimate_total,
        "measured_bytes": int(peak),
        "ratio": peak / estimate_total,
        "how": how,
        "loss": loss,
    }


def _train_steps(plan: Plan, backend: str, dev, steps: int) -> float:
    """``steps`` optimizer steps of a freshly built model of ``plan``'s shape; the last loss."""
    state = "fp32" if backend == "rps" else plan.classifier_state  # bf16 state serves dense and fixed fan-in
    _, step = build_step(plan, backend, dev, classifier_state=state)
    value = float("nan")
    for _ in range(steps):
        value = step()
    return value


def build_step(plan: Plan, backend: str, dev, loss: str = "bce", classifier_state: str = "fp32"):
    """The pipeline's model of ``plan``'s shape (random-init encoder, ``backend`` classifier, the training
    loop's optimizers) on ``dev``, and a function running one optimizer step: ``plan.grad_accum``
    micro-batches of ``plan.batch`` synthetic documents (5 labels each) under the plan's autocast, then the
    optimizer steps. ``classifier_state`` is ``train.classifier_state`` (fp32, or bf16 weights and moments).
    Returns ``(model, step)``; ``step()`` returns the step's mean loss (a device sync)."""
    import torch

    from xmc.config import Config
    from xmc.losses import Positives
    from xmc.model import build_model
    from xmc.runtime import autocast
    from xmc.train.loop import build_optimizers

    config = Config()
    config.classifier.type = backend
    config.classifier.fan_in = plan.fan_in
    config.classifier.fan_in_group = plan.fan_in_group if backend == "fixed_fanin" else 1
    config.classifier.dense_head = plan.dense_head if backend == "fixed_fanin" else 0
    config.classifier.intermediate = plan.intermediate
    config.classifier.rps.compression = plan.rps_compression
    config.train.classifier_optimizer = plan.optimizer
    config.train.classifier_state = classifier_state
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(plan, plan.batch, dev, generator)
    labels = torch.randint(0, plan.labels, (plan.batch, 5), generator=generator)
    positives = Positives.from_lists([row.tolist() for row in labels], plan.labels, device=dev)
    clusters = None
    if plan.meta_clusters:
        import numpy as np

        clusters = np.arange(plan.labels) % plan.meta_clusters
        config.classifier.meta.clusters = plan.meta_clusters
    model = build_model(config, random_encoder(plan), plan.labels, clusters).to(dev)
    optimizers = build_optimizers(config, model)
    scaler = torch.amp.GradScaler(dev.type, enabled=plan.precision == "fp16" and dev.type == "cuda")
    precision = {"fp32": "no"}.get(plan.precision, plan.precision)
    meta_weight = 0.1 if plan.meta_clusters else 0.0
    model.train()

    def step() -> float:
        total = 0.0
        for _ in range(plan.grad_accum):
            with autocast(dev, precision):
                value = model.loss(batch, positives, loss, meta_weight) / plan.grad_accum
            scaler.scale(value).backward()
            total += value.detach()
        for o in optimizers:
            scaler.step(o)
        scaler.update()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        return float(total)

    return model, step


def random_encoder(plan: Plan):
    spec = plan.encoder
    if spec.kind == "bow":
        from xmc.encoders import BowEncoder

        return BowEncoder(spec.features, spec.hidden)
    if spec.kind == "features":
        from xmc.encoders import FeaturesEncoder

        return FeaturesEncoder(spec.hidden)
    from transformers import BertConfig

    from xmc.encoders import TransformerEncoder

    hf = BertConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=max(spec.positions, plan.seq_len),
        type_vocab_size=max(spec.token_types, 1),
    )
    encoder = TransformerEncoder.from_config(hf, gradient_checkpointing=plan.gradient_checkpointing)
    if plan.freeze_encoder:
        encoder.requires_grad_(False)
    return encoder

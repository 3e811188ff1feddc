"""A whole run: data, model, training, selection on dev, test predictions, ``metrics.json``.

The run folder receives the resolved ``config.yaml``, ``model.json`` (what is needed to rebuild the
model without the training data), checkpoints, ``best.safetensors``, ``predictions.npz`` (top 100 of
``data.test``), ``metrics.json`` and TensorBoard logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from xmc.config import Config, save_config
from xmc.data.atomic import atomic_open
from xmc.encoders import build_encoder_and_inputs
from xmc.inference.files import save_predictions
from xmc.metrics import PROPENSITY_PRESETS, evaluate, format_table, inv_propensity
from xmc.model import XMCModel, build_model
from xmc.runtime import device_name, peak_memory, reset_peak_memory, resolve_precision
from xmc.train.data import load_data
from xmc.train.evaluation import most_frequent_topk
from xmc.train.lock import RunLock
from xmc.train.loop import train
from xmc.train.parallel import Parallel
from xmc.train.recipe import Recipe

log = logging.getLogger(__name__)

PREDICT_K = 100


def _label_clusters(config: Config, data, train_inputs) -> np.ndarray:
    """Balanced label clusters from the training documents' features (TF-IDF or embeddings; for a
    transformer, a TF-IDF of the training texts), cached by the source files' checksums."""
    from xmc.clusters import cluster_labels

    X, Y = train_inputs()
    source = data.sources[data.splits["train"].source]
    return cluster_labels(X, Y, config.classifier.meta.clusters, config.seed, sources=source.sources)


def _train_inputs(config: Config, data, inputs):
    """The training split's (X, Y), X the TF-IDF rows or embeddings the encoder reads (for a transformer,
    a TF-IDF of the training texts). The setup steps that need them share one copy (``train_inputs`` in
    :func:`_run`): they read it and never change its values."""
    from xmc.encoders import BowInputs, build_vocabulary, count_matrix, fit_weights, tfidf

    split = data.splits["train"]
    source = data.sources[split.source]
    encoded = inputs[split.source]
    if isinstance(encoded, BowInputs):  # the bow encoder's own rows (bag-of-words files or raw text)
        X = encoded.X
    elif source.features is not None:
        X = np.asarray(source.features)
    else:  # a transformer over raw text
        vocabulary = build_vocabulary(
            source.texts,
            source.sources,
            config.encoder.vocab_size,
            config.encoder.min_df,
            source.variant,
            config.encoder.ngrams,
        )
        counts = count_matrix(source.texts(), vocabulary)
        X = tfidf(counts, fit_weights(counts, config.encoder.weighting))
    return X[split.rows], split.Y


@torch.no_grad()
def _prior_bias(model: XMCModel, Y) -> None:
    """``classifier.bias_init=prior``: bias = log-odds of each label's training frequency, with half a
    document added to every count (labels never seen start at log(0.5 / N), not at minus infinity)."""
    from xmc.metrics import label_frequencies

    p = (label_frequencies(Y) + 0.5) / (Y.shape[0] + 1.0)
    values = torch.from_numpy(np.log(p) - np.log1p(-p))
    if not model.classifier.set_label_bias(values):
        raise ValueError("classifier.bias_init=prior needs classifier.bias=true")


def _label_order(config: Config, model: XMCModel, data, train_inputs) -> None:
    """A dense head's labels (the most frequent) first, then the tail, semantically ordered on request."""
    from xmc.classifiers.head_tail import frequency_order, semantic_order

    cfg = config.classifier
    Y = data.splits["train"].Y
    order = frequency_order(Y, cfg.dense_head)
    if cfg.label_order == "semantic":
        started = time.perf_counter()
        X, Y = train_inputs()
        order = semantic_order(order, cfg.dense_head, X, Y, cfg.fan_in_group, config.seed)
        log.info("semantic label order in %.1f s", time.perf_counter() - started)
    model.classifier.set_order(order)


def _check_fixed_inputs(config: Config, what: str, otherwise: str) -> None:
    """Raise unless the classifier reads the input features as they are (no trainable layer before it)."""
    enc = config.encoder
    fixed_inputs = (enc.type == "bow" and enc.dim == 0) or enc.type == "features"
    if config.classifier.intermediate or not fixed_inputs:
        raise ValueError(
            f"{what}, so the classifier must read them as they are: encoder.type=bow with encoder.dim=0, or "
            f"encoder.type=features, and classifier.intermediate=0; {otherwise}"
        )


def _centroid_ids(config: Config, model: XMCModel, train_inputs) -> None:
    """``classifier.ids=centroid``: each label starts at its training documents' strongest inputs."""
    from xmc.sparse.centroid import init_centroid_ids

    cfg = config.classifier
    _check_fixed_inputs(
        config,
        "classifier.ids=centroid picks each label's ids from its documents' input features",
        "use classifier.ids=random otherwise",
    )
    started = time.perf_counter()
    X, Y = train_inputs()
    classifier = model.classifier
    if getattr(classifier, "head_size", 0) == classifier.num_labels:  # all labels dense: no ids to pick
        return
    if hasattr(classifier, "order"):  # the tail's labels, in its own order
        from xmc.classifiers.head_tail import sp_columns

        Y = sp_columns(Y, classifier.order[classifier.head_size :].numpy())
    report = init_centroid_ids(classifier.layer, X, Y, cfg.centroid_fill)
    fill = {
        "random": "random ids",
        "frequent": "the most frequent inputs",
        "related": "inputs of co-occurring labels' documents (%.1f%%), then the most frequent"
        % (100 * report.get("related", 0.0)),
    }[cfg.centroid_fill]
    log.info(
        "centroid ids in %.1f s; %.1f%% of slots filled with %s (labels with fewer than K features)",
        time.perf_counter() - started,
        100 * report["filled"],
        fill,
    )


def _svm_head(config: Config, model: XMCModel, train_inputs, progress: bool) -> None:
    """``classifier.head_fit=svm``: the dense head's labels fitted by converged SVMs over the training
    inputs (:mod:`xmc.classifiers.svm`), then frozen through training."""
    from xmc.classifiers.head_tail import sp_columns
    from xmc.classifiers.svm import fit_squared_hinge_svms

    _check_fixed_inputs(
        config,
        "classifier.head_fit=svm solves the head's SVMs once over the input features",
        "use classifier.head_fit=sgd otherwise",
    )
    classifier = model.classifier
    X, Y = train_inputs()
    Y = sp_columns(Y, classifier.order[: classifier.head_size].numpy())
    cfg = config.classifier
    W, b = fit_squared_hinge_svms(
        X, Y, cfg.head_c, jobs=cfg.head_jobs or None, seed=config.seed, progress=progress
    )
    classifier.set_head(W, b)


def run_training(
    config: Config,
    run_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    config_name: str | None = None,
    step_hook=None,
) -> dict:
    """Train per ``config`` into ``run_dir``; returns the metrics written to ``metrics.json``.

    Under ``torchrun`` / ``accelerate launch`` every process runs this; they join one process group
    (:mod:`xmc.train.distributed`) and train in ``train.parallel`` mode; rank 0 writes the run folder."""
    from xmc.train import distributed

    owns_group = distributed.launched() and not torch.distributed.is_initialized()
    place, device = distributed.setup(config.train.device)
    par = Parallel(place, config.train.parallel)
    if place.active:
        _check_parallel(config)
    if not place.is_main:  # one process speaks for the run
        logging.getLogger("xmc").setLevel(logging.WARNING)
        progress = False
    torch.manual_seed(config.seed)
    stem = Path(config_name).stem if config_name else "default"
    run = Path(run_dir) if run_dir else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
    run = Path(distributed.broadcast_object(place, str(run)))  # rank 0's clock names the run
    if run.exists() and not run.is_dir():
        raise ValueError(f"--run-dir {run} is a file: name a folder for the run")
    if resume and not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: no run to resume here (config.yaml missing)")
    if not resume and (run / "latest").exists():
        raise ValueError(f"{run} already holds a run: continue it with --resume, or choose another --run-dir")
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    # One run per folder; a second is refused here, before it touches anything.
    with RunLock(run) if place.is_main else contextlib.nullcontext():
        try:
            result = _run(config, run, par, device, resume=resume, progress=progress, step_hook=step_hook)
            if owns_group:
                distributed.shutdown()
            return result
        except BaseException:
            # A run that stopped before its first checkpoint leaves nothing to resume: remove what it made.
            if created and place.is_main and not (run / "latest").exists():
                shutil.rmtree(run, ignore_errors=True)
            raise


def _run(
    config: Config, run: Path, par: Parallel, device, *, resume: bool, progress: bool, step_hook
) -> dict:
    from xmc.train import distributed

    place = par.place

    precision = resolve_precision(config.train.precision, device, strict=True)

    started = time.perf_counter()
    data = load_data(config.data, config.seed)
    encoder, inputs = build_encoder_and_inputs(config.encoder, data.sources, progress=progress)
    meta = config.classifier.meta
    if meta.enabled and not meta.clusters:  # the rule's count, written into the run's config.yaml
        from xmc.classifiers.meta import cluster_count

        meta.clusters = cluster_count(data.num_labels)
    # The training split's inputs, built on first use and shared by the setup steps below (for a
    # transformer a TF-IDF of its texts); released before training.
    train_inputs = functools.cache(lambda: _train_inputs(config, data, inputs))
    clusters = _label_clusters(config, data, train_inputs) if meta.enabled else None
    model = build_model(config, encoder, data.num_labels, clusters)
    if hasattr(model.classifier, "set_order"):  # deterministic: a resumed run's checkpoint holds the same
        _label_order(config, model, data, train_inputs)
    # Like fan_in and set, ids is a fixed fan-in option: other classifiers ignore it.
    if config.classifier.ids == "centroid" and config.classifier.type == "fixed_fanin" and not resume:
        _centroid_ids(config, model, train_inputs)
    if config.classifier.bias_init == "prior":
        _prior_bias(model, data.splits["train"].Y)
    head, head_fit_seconds = getattr(model.classifier, "head", None), None
    if config.classifier.head_fit == "svm" and head is not None and not resume:  # else the checkpoint's
        fit_started = time.perf_counter()
        _svm_head(config, model, train_inputs, progress)
        head_fit_seconds = time.perf_counter() - fit_started
    del train_inputs
    model = par.prepare(model, device)  # label shard
    if place.is_main:
        save_config(config, run / "config.yaml")
        _write_json(run / "model.json", _model_card(config, model, data))
    if config.encoder.type == "transformer" and place.is_main:  # rebuilt later without the source folder
        from xmc.encoders import load_tokenizer, resolve_model_path

        model.encoder.model.config.save_pretrained(run / "encoder")
        load_tokenizer(resolve_model_path(config.encoder.name_or_path)).save_pretrained(run / "encoder")
    log.info(
        "%s | %d train / %d dev / %d test documents, %d labels | %s on %s (%s)",
        run,
        len(data.splits["train"].rows),
        len(data.splits["dev"].rows) if "dev" in data.splits else 0,
        len(data.splits["test"].rows) if "test" in data.splits else 0,
        data.num_labels,
        config.classifier.type,
        device,
        precision,
    )

    meta_weight_fn = None
    if model.meta is not None:
        from xmc.classifiers.meta import meta_weight

        m = config.classifier.meta
        meta_weight_fn = lambda progress_epochs: meta_weight(progress_epochs, m.lam0, m.cutoff_epoch)  # noqa: E731
    recipe = Recipe(
        config, model, data, inputs, run, device, precision, par, meta_weight_fn, progress, step_hook
    )
    if device.type == "cuda":  # the CPU's peak stays the whole process's, data loading included
        reset_peak_memory(device)
    position = train(recipe, resume=resume)
    train_seconds = position.train_seconds  # over every session of the run, resumes included
    par.load_model(model, run / "best.safetensors")

    Y_train = data.splits["train"].Y
    A, B = PROPENSITY_PRESETS[config.data.propensity]
    inv_prop = inv_propensity(Y_train, A, B)
    results: dict = {}
    if "dev" in data.splits:
        results["dev"] = recipe.evaluate(data.splits["dev"], inv_prop)
    if "test" in data.splits:
        test = data.splits["test"]
        scores, ids = recipe.predict(test, PREDICT_K)
        if place.is_main:
            save_predictions(run / "predictions.npz", scores, ids)
        results["test"] = evaluate(test.Y, ids, inv_prop=inv_prop, exclude=test.exclude)
        baseline = most_frequent_topk(Y_train, len(test.rows), 5 + _exclude_width(test))
        results["baseline_most_frequent"] = evaluate(test.Y, baseline, exclude=test.exclude)
    examples = position.examples
    results.update(
        peak_memory_bytes=peak_memory(device),
        train_seconds=train_seconds,
        head_fit_seconds=head_fit_seconds,  # the SVM head solved before training (None: not this session)
        total_seconds=time.perf_counter() - started,
        examples_per_second=examples / max(train_seconds, 1e-9),
        epochs=position.epoch,
        optimizer_steps=position.step,
        skipped_steps=position.skipped,
        params=model.parameter_counts(),
        classifier_bytes=model.classifier_bytes(),
        classifier_state_bytes=model.training_state_bytes(config.train.classifier_optimizer),
        device=device_name(device),
        precision=precision,
        world_size=place.world,
        parallel=config.train.parallel if place.active else "none",
        history=[h for h in position.history if "epoch" in h],
    )
    if place.is_main:
        _write_json(run / "metrics.json", results)
        _plots(run, results, data, ids if "test" in data.splits else None)
        _report(run, results)
    distributed.barrier(place)
    return results


def _plots(run: Path, results: dict, data, ids: np.ndarray | None) -> None:
    """``plots/overview.png``: the test P@k by label-frequency decile and the training curves
    (:mod:`xmc.plots`); skipped with one log line when matplotlib is not installed."""
    from xmc.plots import PlotUnavailable, RunPicture, decile_precision, plot_runs

    deciles = None
    if ids is not None:
        test = data.splits["test"]
        deciles = decile_precision(test.Y, ids, data.splits["train"].Y, exclude=test.exclude)
    (run / "plots").mkdir(exist_ok=True)
    try:
        plot_runs([RunPicture(run.name, deciles, results["history"])], run / "plots" / "overview.png")
    except PlotUnavailable as err:
        log.info("no plots/: %s", err)
    except ValueError as err:  # nothing to draw: a picture is no reason to fail a finished run
        log.warning("no plots/overview.png: %s", err)


def _check_parallel(config: Config) -> None:
    """What multi-process training does not do (yet), said before any work starts."""
    s = config.classifier.set
    if (
        s.enabled
        and s.regrow == "gradient"
        and (config.classifier.type == "fixed_fanin" or config.classifier.intermediate_fan_in)
    ):
        raise ValueError(
            "classifier.set.regrow=gradient runs in a single process only (it ranks regrowth by one "
            "rank's batch): use classifier.set.regrow=random under torchrun / accelerate launch"
        )


def _exclude_width(split) -> int:
    return 0 if split.exclude is None else int(np.diff(split.exclude.indptr).max(initial=0))


def _model_card(config: Config, model: XMCModel, data) -> dict:
    return {
        "num_labels": data.num_labels,
        "label_names": data.label_names,
        "encoder_out_features": model.encoder.out_features,
        "encoder_num_features": int(model.encoder.idf.numel()) if hasattr(model.encoder, "idf") else None,
        "format": data.format,
        "meta_clusters": config.classifier.meta.clusters if model.meta is not None else 0,
    }


def _write_json(path: Path, value) -> None:
    with atomic_open(path) as handle:
        handle.write(json.dumps(value, indent=2, default=float).encode())


def _report(run: Path, results: dict) -> None:
    lines = [f"run: {run}"]
    if "test" in results:
        model = {k: v for k, v in results["test"].items() if k.startswith("P@")}
        base = results["baseline_most_frequent"]
        lines.append("test          P@1     P@3     P@5")
        lines.append("model      " + "".join(f"{100 * model[f'P@{k}']:8.2f}" for k in (1, 3, 5)))
        lines.append("most freq  " + "".join(f"{100 * base[f'P@{k}']:8.2f}" for k in (1, 3, 5)))
        lines.append("all test metrics (%):")
        lines.append(format_table(results["test"]))
    elif "dev" in results:
        lines.append("dev metrics (%):")
        lines.append(format_table(results["dev"]))
    lines.append(
        f"{results['epochs']} epochs, {results['optimizer_steps']} steps in {results['train_seconds']:.0f} s "
        f"({results['examples_per_second']:.0f} examples/s) on {results['device']}; classifier "
        f"{results['classifier_bytes'] / 2**20:.1f} MiB"
    )
    print("\n".join(lines))

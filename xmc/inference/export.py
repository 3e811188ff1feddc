"""``xmc export``: a run's best model in the condensed form of :mod:`xmc.inference.condensed`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from xmc.inference.condensed import CONDENSED


def export_condensed(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write the condensed form of the best model of ``run_dir`` into ``out_dir`` (a new folder);
    returns the byte counts recorded in its ``model.json``. Needs a fixed fan-in classifier."""
    from xmc.classifiers import FixedFanInClassifier
    from xmc.classifiers.head_tail import HeadTailClassifier
    from xmc.inference.predictor import Predictor
    from xmc.nn import AblatableFixedFanInLinear, FixedFanInLinear

    run, out = Path(run_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose another --out or remove it")
    model = Predictor(run, device="cpu").model
    classifier = model.classifier
    if isinstance(classifier, HeadTailClassifier) and classifier.tail is None:
        raise ValueError(
            f"{run}: every label is in the dense head (classifier.dense_head = all labels); only fixed "
            "fan-in layers condense"
        )
    if not isinstance(classifier, (FixedFanInClassifier, HeadTailClassifier)):
        raise ValueError(
            f"{run}: the classifier is {type(model.classifier).__name__}, not fixed fan-in; only fixed "
            "fan-in layers condense (train with classifier.type=fixed_fanin)"
        )
    state = model.encoder.state_dict()
    tensors = {f"encoder.{k}": v.detach().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    extra = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    sizes = {"encoder": sum(v.numel() * v.element_size() for v in tensors.values())}
    layers = {"classifier": classifier.layer}
    if isinstance(
        classifier, HeadTailClassifier
    ):  # the tail condenses; the head and the order go as they are
        head = {"order": classifier.order.to(torch.int32 if classifier.num_labels < 2**31 else torch.int64)}
        if classifier.head is not None:
            head["head_weight"] = classifier.head.weight.detach().float()
            if classifier.head.bias is not None:
                head["head_bias"] = classifier.head.bias.detach().float()
        tensors.update({f"classifier.{k}": v.contiguous() for k, v in head.items()})
    if model.intermediate is not None:
        layers["intermediate"] = model.intermediate
    for name, layer in layers.items():
        if isinstance(layer, FixedFanInLinear):
            # A grouped layer's ids are written per label: the condensed format has one id row per output.
            part = {"values": layer.weight.detach().float(), "ids": layer.label_ids()}
            if isinstance(layer, AblatableFixedFanInLinear):
                part["neurons"] = layer.neurons
        else:  # a dense intermediate layer
            part = {"weight": layer.weight.detach().float()}
        if layer.bias is not None:
            part["bias"] = layer.bias.detach().float()
        if name == "classifier" and isinstance(classifier, HeadTailClassifier):
            part.update({k: tensors[f"classifier.{k}"] for k in head})
        sizes[name] = sum(v.numel() * v.element_size() for v in part.values())
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in part.items()})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / CONDENSED))
    if extra:
        (tmp / "condensed.extra.json").write_text(json.dumps(extra))
    shutil.copy(run / "config.yaml", tmp / "config.yaml")
    if (run / "encoder").is_dir():
        shutil.copytree(run / "encoder", tmp / "encoder")
    card = json.loads((run / "model.json").read_text())
    card["condensed"] = {"bytes": sizes, "source_run": str(run.resolve())}
    (tmp / "model.json").write_text(json.dumps(card, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return sizes

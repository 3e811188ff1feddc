"""``train.select``: the dev metric that keeps the best model and that patience watches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xmc.config import ConfigError, load_config
from xmc.train.loop import Position, _evaluate

# P@1 peaks at the 2nd evaluation, P@5 at the 3rd, nDCG@3 at the 1st.
DEV = [
    {"P@1": 0.50, "P@3": 0.40, "P@5": 0.30, "nDCG@3": 0.60},
    {"P@1": 0.70, "P@3": 0.41, "P@5": 0.31, "nDCG@3": 0.50},
    {"P@1": 0.60, "P@3": 0.42, "P@5": 0.35, "nDCG@3": 0.40},
    {"P@1": 0.65, "P@3": 0.39, "P@5": 0.33, "nDCG@3": 0.45},
]


def _recipe(tmp_path, select: str, patience: int = 0):
    saved: list[int] = []
    scores = iter(DEV)
    evaluation = {"n": 0}

    def evaluate(split):
        evaluation["n"] += 1
        return next(scores)

    def save_model(model, path):
        assert path == tmp_path / "best.safetensors"
        saved.append(evaluation["n"])

    config = load_config(None, [f"train.select={select}", f"train.patience={patience}"])
    recipe = SimpleNamespace(
        config=config,
        parallel=SimpleNamespace(save_model=save_model),
        run_dir=tmp_path,
        model=None,
        data=SimpleNamespace(splits={"dev": None}),
        evaluate=evaluate,
    )
    return recipe, saved


@pytest.mark.parametrize(("select", "kept"), [("P@1", [1, 2]), ("P@5", [1, 2, 3]), ("nDCG@3", [1])])
def test_the_best_model_is_the_one_with_the_best_select_metric(tmp_path, select, kept):
    recipe, saved = _recipe(tmp_path, select)
    pos = Position()
    for epoch in range(1, len(DEV) + 1):
        pos.epoch = epoch
        pos.history.append({"epoch": epoch})
        assert not _evaluate(recipe, pos, writer=None)  # patience 0: never stops
    assert saved == kept  # the last save is the evaluation that peaked on the select metric
    assert pos.best == max(d[select] for d in DEV)
    assert pos.history[1]["dev/P@1"] == DEV[1]["P@1"]  # every metric is logged whichever is selected


def test_patience_counts_evaluations_without_the_select_metric_improving(tmp_path):
    recipe, _ = _recipe(tmp_path, "nDCG@3", patience=2)
    pos = Position()
    stops = []
    for epoch in range(1, 4):
        pos.epoch = epoch
        pos.history.append({})
        stops.append(_evaluate(recipe, pos, writer=None))
    assert stops == [False, False, True]  # nDCG@3 fell at evaluations 2 and 3 (P@1 rose at 2)


def test_an_unknown_select_metric_names_the_choices():
    with pytest.raises(ConfigError, match=r"train.select must be one of P@1, P@3, P@5, nDCG@1.*got 'PSP@5'"):
        load_config(None, ["train.select=PSP@5"])

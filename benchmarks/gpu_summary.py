"""``summary.md`` of ``gpu_suite.py``: one table of the stages, then a table per benchmark from its rows,
in the units the README quotes (ms, GiB, percentages for the metrics)."""

from __future__ import annotations

from pathlib import Path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _stages(summary: dict) -> list[str]:
    rows = []
    for number, entry in enumerate(summary["stages"], 1):
        figures = "; ".join(f"{k} {_fmt(v)}" for k, v in list(entry["figures"].items())[:12])
        detail = entry["reason"] if entry["status"] != "ok" else figures
        detail = detail.replace("|", "/").replace("\n", " ")[:400]
        rows.append([str(number), entry["title"], entry["status"], f"{entry['seconds']:.0f}", detail])
    return _table(["#", "stage", "status", "s", "key figures (or why not)"], rows)


def _kernels(rows: list[dict]) -> list[str]:
    kernels = [r for r in rows if r["bench"] == "kernel" and "error" not in r]
    lines = []
    if kernels:
        body = [
            [r["variant"], f"{r['L']:,}", str(r["K"] or "-"), r["what"]]
            + [_num(r["ms"], 3), _num(r["floor_ms"], 3), f"{r['floor_pct']:.1f}%"]
            for r in kernels
        ]
        lines += ["", "Kernels (bf16 x, B = {B}, D = {D}):".format(**kernels[0]), ""]
        lines += _table(["variant", "L", "K", "what", "ms", "floor ms", "% of floor"], body)
    steps = [r for r in rows if r["bench"] == "classifier_step" and "error" not in r]
    if steps:
        body = [
            [r["variant"], f"{r['L']:,}", str(r["K"] or "-"), _num(r["ms"], 2), _num(r["peak_allocated_gib"])]
            + [_num(r["floor_ms"], 2), f"{r['floor_pct']:.1f}%"]
            for r in steps
        ]
        lines += ["", "Classifier training step (forward, BCE, backward, AdamW):", ""]
        lines += _table(["classifier", "L", "K", "ms", "peak GiB", "floor ms", "% of floor"], body)
    return lines


def _train_steps(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        name = r["classifier"] + (f" K={r['fan_in']}" if r.get("fan_in") else "")
        if "error" in r:
            body.append([f"{r['labels']:,}", name, r["classifier_state"], r["error"][:80], "", "", "", ""])
            continue
        body.append(
            [f"{r['labels']:,}", name, r["classifier_state"], _num(r["step_ms"], 1)]
            + [_num(r["examples_per_second"], 0), _num(r.get("peak_allocated_gib"))]
            + [_num(r["estimate_bytes"] / 2**30), _num(r.get("estimate_ratio"))]
        )
    if not body:
        return []
    r = rows[0]
    title = f"Training steps ({r['encoder']}, length {r['seq_len']}, "
    title += f"micro-batch {r['micro_batch']} x {r['accumulate']}):"
    header = ["labels", "classifier", "state", "step ms", "ex/s", "peak GiB", "estimate GiB"]
    return ["", title, ""] + _table([*header, "peak / estimate"], body)


def _million(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    body = [
        [_fmt(r["labels"]), str(r["epochs"]), _pct(r["test P@1"]), _pct(r["test P@5"])]
        + [_pct(r["most frequent P@1"]), _num(r["P@1 / most frequent"], 1)]
        + [_num(r["train_seconds"], 0), _num(r["peak GiB"])]
        for r in rows
    ]
    header = ["labels", "epochs", "test P@1", "P@5", "most frequent P@1", "ratio", "train s", "peak GiB"]
    title = "Synthetic labels (TF-IDF into fixed fan-in with centroid ids, configs/citeulike-t-tfidf.yaml):"
    return ["", title, ""] + _table(header, body)


def _minilm(rows: list[dict]) -> list[str]:
    body = [
        [r["config"], str(r["epochs"])]
        + [_pct(r["test"]["P@1"]), _pct(r["test"]["P@3"]), _pct(r["test"]["P@5"])]
        + [_pct(r["baseline_most_frequent"]["P@1"]), _num(r["train_seconds"], 0)]
        + [_num(r["examples_per_second"], 0), _num(r["peak_allocated_gib"])]
        for r in rows
    ]
    header = ["config", "epochs", "P@1", "P@3", "P@5", "most frequent P@1", "train s", "ex/s", "peak GiB"]
    title = "MiniLM-L6 on EURLEX57K (length 128, test = the official dev split):"
    return ["", title, ""] + _table(header, body) if body else []


def write_markdown(summary: dict, ctx, path: Path) -> None:
    """Write ``summary.md`` for ``summary`` (the suite's summary.json), reading the rows under ``ctx.out``."""
    env = next((e["figures"] for e in summary["stages"] if e["name"] == "environment"), {})
    where = ", ".join(
        f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "driver", "git") if env.get(k) is not None
    )
    mode = " (--tiny: toy shapes, figures mean nothing)" if summary["tiny"] else ""
    lines = [f"### GPU suite: {env.get('device', 'unknown device')}, {summary['date'][:10]}{mode}", ""]
    if where:
        lines += [where, ""]
    lines += _stages(summary)
    lines += _kernels(ctx.rows("fixed_fanin"))
    lines += _train_steps(ctx.rows("train_step"))
    lines += _million(ctx.rows("million_labels"))
    lines += _minilm(ctx.rows("minilm_eurlex"))
    path.write_text("\n".join(lines) + "\n")

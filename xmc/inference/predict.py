"""The prediction loop: top-k labels of a set of documents, in batches and bounded memory.

One loop serves training's evaluations, ``xmc.load``'s predictor and multi-process runs; a
:class:`~xmc.train.parallel.Parallel` of several ranks only changes how one batch is scored
(:meth:`~xmc.train.parallel.Parallel.topk_batch`).
"""

from __future__ import annotations

import numpy as np
import torch

from xmc.runtime import autocast


@torch.no_grad()
def predict_rows(
    model,
    source,
    rows: np.ndarray,
    device: torch.device,
    precision: str,
    batch_size: int,
    k: int,
    parallel=None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 (len(rows), k), ids int32 (len(rows), k))`` of documents ``rows`` of the inputs
    ``source``, best first, in eval mode and batches of ``batch_size``. Over several ranks
    (``parallel``, a :class:`~xmc.train.parallel.Parallel`) every rank takes part and gets the whole."""
    model.eval()
    several = parallel is not None and parallel.active
    scores = np.empty((len(rows), k), np.float32)
    ids = np.empty((len(rows), k), np.int32)
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        if several:
            top_scores, top_ids = parallel.topk_batch(model, source, part, device, precision, k)
        else:
            batch = {key: v.to(device, non_blocking=True) for key, v in source.batch(part).items()}
            with autocast(device, precision):
                h = model.represent(batch)
            top_scores, top_ids = model.classifier.topk(h.float(), k)
        scores[start : start + len(part)] = top_scores.cpu().numpy()
        ids[start : start + len(part)] = top_ids.cpu().numpy()
    return scores, ids

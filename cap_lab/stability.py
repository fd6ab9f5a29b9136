"""How stable are the head scores? Two disjoint calibration draws, compared as the set grows.

CAP's factors (paper Sec. 3.3) are only as good as the head ranking behind them, and the paper
scores on 128-256 examples per task. At CPU scale the calibration set is much smaller, so this
study asks how large it must be for the ranking to stop depending on which examples were drawn.

For each scorer and each size ``n`` (examples per task), two calibration sets are built from
disjoint halves of every task's pool (``CalibrationConfig.draw`` 0 and 1, same seed, same K,
same length cap; :mod:`cap_lab.calibration`), each is scored with :func:`cap_lab.scoring.head_scores`
(cached), and the two score sets are compared with :func:`cap_lab.scoring.compare.compare_scores`:

* ``spearman``: Spearman rank correlation over all heads;
* ``top_overlap``: fraction of the top 10% of heads of draw 0 that are also top in draw 1;
* ``pruned_differently``: fraction of prunable weights that CAP prunes under one draw's scores
  and not the other's at 20% sparsity (the model is only read).

:func:`smallest_stable_size` then picks the smallest size whose Spearman reaches a threshold
(0.8 by default), which is how the ``cpu`` profile's calibration was chosen (README, notebook 02).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Mapping, Sequence

import pandas as pd

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.scoring import head_scores
from cap_lab.scoring.compare import compare_scores

STABILITY_COLUMNS = ["model", "method", "n_per_task", "n_subsets", "max_length", "tokens_draw0", "tokens_draw1",
                     "spearman", "kendall", "top_overlap", "top_k", "pruned_differently", "sparsity", "seconds"]


def draw_configs(base: CalibrationConfig, n_per_task: int) -> tuple[CalibrationConfig, CalibrationConfig]:
    """The two disjoint draws of size ``n_per_task`` (everything else as in ``base``)."""
    return tuple(replace(base, n_per_task=n_per_task, draw=d) for d in (0, 1))


def stability_study(lm, base: CalibrationConfig, sizes: Mapping[str, Sequence[int]], *, data_dir=None,
                    batch_size: int = 8, sparsity: float = 0.2, top_fraction: float = 0.1,
                    progress: bool = True) -> pd.DataFrame:
    """Agreement of head scores from two disjoint calibration draws, per scorer and size.

    Args:
        lm: a loaded model (only read; scores come from and go to the score cache).
        base: the calibration settings (K, seed, length cap, tasks); ``n_per_task`` and
            ``draw`` are set per point.
        sizes: ``{method: [n_per_task, ...]}``, e.g. ``{"exact": [3], "attribution": [4, 16, 128]}``.
        data_dir: benchmark data folder.
        batch_size: calibration items per scoring forward.
        sparsity: sparsity of the pruning comparison.
        top_fraction: fraction of heads in the top set.
        progress: one line per point.

    Returns:
        One row per (method, n_per_task) with the columns :data:`STABILITY_COLUMNS`; ``seconds``
        is the wall time of the point (near 0 when both score sets came from the cache).
    """
    name = lm.identity()["name"]
    rows = []
    for method, ns in sizes.items():
        for n in ns:
            start = time.perf_counter()
            calibs = [build_calibration_set(lm.tokenizer, cfg, data_dir) for cfg in draw_configs(base, n)]
            shared = {it.example.uid for it in calibs[0].items} & {it.example.uid for it in calibs[1].items}
            assert not shared, f"draws share examples: {sorted(shared)[:3]}"
            scores = [head_scores(lm, c, method=method, batch_size=batch_size, progress=False) for c in calibs]
            agreement = compare_scores(scores[0], scores[1], lm.model, sparsity=sparsity, top_fraction=top_fraction)
            rows.append(dict(model=name, method=method, n_per_task=n, n_subsets=base.n_subsets,
                             max_length=base.max_length, tokens_draw0=calibs[0].n_tokens,
                             tokens_draw1=calibs[1].n_tokens, **agreement.to_dict(),
                             seconds=time.perf_counter() - start))
            if progress:
                r = rows[-1]
                print(f"{name}: {method:>11} n={n:<4} spearman {r['spearman']:+.3f}  top {r['top_overlap']:.2f}  "
                      f"pruned differently {r['pruned_differently']:.4f}  ({r['seconds']:.0f} s)", flush=True)
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)


def smallest_stable_size(study: pd.DataFrame, method: str, threshold: float = 0.8) -> int | None:
    """The smallest ``n_per_task`` of ``method`` whose Spearman reaches ``threshold`` (``None``: none does).

    With several models in ``study`` the size must reach it on every model.
    """
    rows = study[study["method"] == method]
    if rows.empty:
        raise ValueError(f"the study has no rows of method {method!r}; it has: {sorted(set(study['method']))}")
    worst = rows.groupby("n_per_task")["spearman"].min().sort_index()
    reached = worst[worst >= threshold]
    return None if reached.empty else int(reached.index[0])

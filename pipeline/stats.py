"""The few statistics the reports quote, from SciPy: correlation (the paper's LAL analysis) and
separation (how well a score tells real samples from negative controls)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _defined(x: Sequence[float], y: Sequence[float]) -> bool:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return len(x) >= 2 and x.std() > 0 and y.std() > 0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when undefined (fewer than 2 points, or a constant variable)."""
    return float(stats.pearsonr(x, y).statistic) if _defined(x, y) else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (ties share their mean rank); NaN when undefined."""
    return float(stats.spearmanr(x, y).statistic) if _defined(x, y) else float("nan")


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting one half: the area under the ROC
    curve of the score, i.e. the Mann-Whitney U of the positives over ``n_pos * n_neg``.
    1 separates perfectly, 0.5 not at all, below 0.5 the score points the other way. NaN
    when either side is empty; non-finite values are left out."""
    pos = [float(v) for v in positives if v is not None and math.isfinite(v)]
    neg = [float(v) for v in negatives if v is not None and math.isfinite(v)]
    if not pos or not neg:
        return float("nan")
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (len(pos) * len(neg))

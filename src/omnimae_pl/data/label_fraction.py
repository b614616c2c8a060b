"""A class-balanced fraction of a labelled training split, for low-label fine-tuning ("1 % / 10 % of the labels").

The same (labels, fraction, seed) always keep the same items, so a pretrained and a from-scratch run (or two
ranks) see the same labelled subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omnimae_pl.errors import check_value


def check_fraction(fraction: float, key: str = "train_fraction") -> None:
    check_value(0.0 < fraction <= 1.0, key, fraction, "must be in (0, 1]: the share of the training split kept")


def stratified_indices(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping ``round(fraction * n_c)`` items (at least one) of every class ``c``."""
    check_fraction(fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)

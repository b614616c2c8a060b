from __future__ import annotations

import numpy as np
import pytest

from omnimae_pl.data.label_fraction import stratified_indices


def test_keeps_a_balanced_share_of_every_class() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    keep = stratified_indices(labels, 0.1, seed=0)
    assert list(np.bincount(labels[keep])) == [5, 3, 1]  # round(0.3) = 0, but every class keeps one
    assert list(keep) == sorted(set(keep.tolist()))
    assert np.array_equal(keep, stratified_indices(list(labels), 0.1, seed=0))  # same seed, same items
    assert not np.array_equal(keep, stratified_indices(labels, 0.1, seed=1))
    assert len(stratified_indices(labels, 1.0)) == len(labels)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_rejects_fractions_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        stratified_indices([0, 1], fraction)

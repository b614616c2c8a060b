"""Rows and the speed-ups between them."""

from __future__ import annotations

import pytest

from omnimae_pl.bench.rows import FIELDS, format_row, oom_row, row, speedups


def _row(impl, modality, batch, precision, compiled, sps):
    return {"impl": impl, "modality": modality, "batch": batch, "precision": precision, "compiled": compiled,
            "grad_ckpt": False, "samples_per_s": sps}


def test_speedups_pair_ours_with_official():
    rows = [_row("ours", "image", 8, "bf16", False, 100.0), _row("ours", "image", 8, "bf16", "step", 150.0),
            _row("official", "image", 8, "fp16", False, 50.0), _row("official", "image", 8, "bf16", False, 60.0)]
    r = speedups(rows)
    assert r["image: ours best / official fp16"] == pytest.approx(3.0)
    assert r["image: ours eager / official bf16"] == pytest.approx(100 / 60)
    assert r["image b=8: compiled / eager"] == pytest.approx(1.5)


def test_row_rates_and_mfu():
    r = row("ours", "image", 8, "bf16", False, False, 0.5, 2e12, 100.0, None, 1.0, None)
    assert tuple(r) == FIELDS
    assert r["samples_per_s"] == 16 and r["steps_per_s"] == 2 and r["tflops_per_s"] == pytest.approx(32.0)
    assert r["mfu"] == pytest.approx(0.32)
    varying = row("ours-e2e", "image+video", {"image": 8, "video": 2}, "bf16", False, False, 0.5, 2e12, None, None,
                  1.0, None, samples_per_step=5)
    assert varying["samples_per_s"] == 10 and varying["mfu"] is None
    assert "b=8/2" in format_row(varying)


def test_out_of_memory_rows_print():
    assert format_row(oom_row("official", "video", 32, "fp16", False, True)).split() == [
        "official", "video", "b=32", "fp16", "OOM"]

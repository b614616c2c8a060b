"""The benchmark runs end to end on the CPU in fp32 and reports its fields (it never asserts speed)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from omnimae_pl import bench
from omnimae_pl.masking import make_mask
from omnimae_pl.models.tokens import visible_indices

TINY = ["--size", "tiny", "--model-overrides", "embed_dim=64,depth=2,num_heads=4,decoder_embed_dim=32,decoder_depth=1,"
        "decoder_num_heads=4", "--img-size", "32", "--num-frames", "4", "--steps", "1", "--warmup", "1",
        "--batch-size", "2", "--device", "cpu"]


def test_cpu_smoke_reports_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--modality", "both", "--end-to-end", "--e2e-data", "synthetic", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = result["rows"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["modality"] for r in ours} == {"image", "video"}
    for r in rows:
        for field in bench.FIELDS:
            assert field in r, field
        assert r["samples_per_s"] > 0 and r["steps_per_s"] > 0
        assert r["precision"] == "fp32"  # CPU default
        assert torch.isfinite(torch.tensor(r["loss"]))
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no peak known for a CPU, no CUDA memory
    assert [r for r in rows if r["impl"] == "ours-e2e"]
    # FLOPs per sample come from the analytic counter
    image = next(r for r in ours if r["modality"] == "image")
    assert image["gflops_per_sample"] * 1e9 == pytest.approx(result["info"]["flops_per_sample"]["image"])
    assert "samples/s" in printed and "GFLOP/sample" in printed and "BENCH_JSON" in printed
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] == torch.__version__ and len(saved["rows"]) == len(rows)


def test_cpu_smoke_with_model_ids_and_mfu_override():
    from omnimae_pl.models.patch import TubeletEmbed

    forward = TubeletEmbed.forward
    result = bench.main([*TINY, "--modality", "video", "--ids", "model", "--peak-tflops", "1.0",
                         "--grad-ckpt", "video", "--patch-embed", "conv"])
    assert TubeletEmbed.forward is forward  # the Conv3d 'before' path is undone after the run
    (row,) = result["rows"]
    assert row["modality"] == "video" and row["grad_ckpt"] is True
    assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 1.0)


def test_static_visible_ids_match_the_model():
    g = torch.Generator().manual_seed(0)
    for grid, ratio in (((1, 14, 14), 0.9), ((8, 14, 14), 0.95), ((2, 4, 4), 0.5)):
        mask = torch.stack([make_mask(grid, ratio, "random", g) for _ in range(3)]).flatten(1)
        n_vis = mask.shape[1] - int(mask[0].sum())
        assert torch.equal(bench.visible_ids(mask, n_vis), visible_indices(mask))


def test_peak_tflops():
    assert bench.peak_tflops_for(torch.device("cpu"), "fp32", None) is None
    assert bench.peak_tflops_for(torch.device("cpu"), "bf16", 123.0) == 123.0


def test_ratios_pair_ours_with_official():
    def row(impl, modality, batch, precision, compiled, sps):
        return {"impl": impl, "modality": modality, "batch": batch, "precision": precision, "compiled": compiled,
                "grad_ckpt": False, "samples_per_s": sps}

    rows = [row("ours", "image", 8, "bf16", False, 100.0), row("ours", "image", 8, "bf16", "step", 150.0),
            row("official", "image", 8, "fp16", False, 50.0), row("official", "image", 8, "bf16", False, 60.0)]
    r = bench._ratios(rows)
    assert r["image: ours best / official fp16"] == pytest.approx(3.0)
    assert r["image: ours eager / official bf16"] == pytest.approx(100 / 60)
    assert r["image b=8: compiled / eager"] == pytest.approx(1.5)


def test_import_official_stubs_hydra(tmp_path):
    """The out-of-tree import harness: a snapshot whose model code imports hydra, which is not installed."""
    pkg = tmp_path / "omnimae"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "omni_mae_model.py").write_text("import hydra\n\ndef vit_base_mae_pretraining(pretrained=True):\n"
                                           "    return 'built'\n")
    saved_path, saved = list(sys.path), {k: sys.modules.get(k) for k in ("hydra", "hydra.utils", "omnimae")}
    try:
        mod = bench.import_official(str(tmp_path))
        assert mod.vit_base_mae_pretraining(pretrained=False) == "built"
        with pytest.raises(FileNotFoundError):
            bench.import_official(str(tmp_path / "missing"))
    finally:
        sys.path[:] = saved_path
        for k in ("hydra", "hydra.utils", "omnimae", "omnimae.omni_mae_model"):
            sys.modules.pop(k, None)
        sys.modules.update({k: v for k, v in saved.items() if v is not None})

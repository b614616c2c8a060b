"""The whole benchmark on the CPU in fp32: options, defaults, every reported field, the JSON (never speed)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import omnimae_pl.bench
from omnimae_pl.bench import cli
from omnimae_pl.bench.rows import FIELDS


def test_help_exits_0_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        omnimae_pl.bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: omnimae-cli bench") and "--end-to-end" in out


def test_main_reads_sys_argv_without_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["omnimae-cli", "--help"])
    with pytest.raises(SystemExit):
        omnimae_pl.bench.main()
    assert "usage: omnimae-cli bench" in capsys.readouterr().out


def test_model_overrides_take_yaml_values_and_lists():
    args = cli.build_parser().parse_args(["--size", "tiny", "--device", "cpu",
                                          "--model-overrides", "depth=2, patch_size=[2, 8, 8],mlp_ratio=2.0"])
    cli.resolve(args, torch.device("cpu"))
    assert (args.spec.depth, args.spec.patch_size, args.spec.mlp_ratio) == (2, (2, 8, 8), 2.0)


def test_malformed_model_override_is_a_one_line_error(capsys):
    from omnimae_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--size", "tiny", "--model-overrides", "depth"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnimae-cli: error: --model-overrides: 'depth' is not key=value") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["bench", "--size", "tiny", "--model-overrides", "depth="])
    assert "--model-overrides: 'depth=' is not key=value" in capsys.readouterr().err


def test_cpu_smoke_reports_every_field(tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = omnimae_pl.bench.main([*tiny, "--modality", "both", "--end-to-end", "--e2e-data", "synthetic",
                                    "--json", str(out)])
    printed = capsys.readouterr().out
    rows = result["rows"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["modality"] for r in ours} == {"image", "video"}
    for r in rows:
        for field in FIELDS:
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
    assert saved["args"]["workers_resolved"] == 0 and "spec" not in saved["args"]


def test_cpu_smoke_with_video_checkpointing_and_mfu_override(tiny):
    result = omnimae_pl.bench.main([*tiny, "--modality", "video", "--peak-tflops", "1.0", "--grad-ckpt", "video"])
    (row,) = result["rows"]
    assert row["modality"] == "video" and row["grad_ckpt"] is True
    assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 1.0)


def test_peak_tflops():
    assert cli.peak_tflops_for(torch.device("cpu"), "fp32", None) is None
    assert cli.peak_tflops_for(torch.device("cpu"), "bf16", 123.0) == 123.0

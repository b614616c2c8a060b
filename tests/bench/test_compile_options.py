"""``--compile-mode``, ``--compile-backend`` and ``--decoder-head-pad`` on the CPU (never speed)."""

from __future__ import annotations

import argparse

import pytest
import torch

import omnimae_pl.bench
from omnimae_pl.bench.step import OursLoss, attention_shapes, compile_settings, per_sample_counts, synthetic_batches
from omnimae_pl.masking import PAPER_MASK_RATIO
from omnimae_pl.models import model_size, omnimae_pretrain

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_compile_settings_per_device_and_backend():
    assert compile_settings("default", "inductor", CUDA) == (None, None)
    assert compile_settings("reduce-overhead", "inductor", CUDA) == ("reduce-overhead", None)
    assert compile_settings("max-autotune-no-cudagraphs", "inductor", CPU) == ("max-autotune-no-cudagraphs", None)
    mode, note = compile_settings("reduce-overhead", "inductor", CPU)
    assert mode is None and "CUDA graphs need a CUDA device" in note
    mode, note = compile_settings("reduce-overhead", "aot_eager", CUDA)
    assert mode is None and "Inductor's" in note


def test_reduce_overhead_starts_a_cudagraph_step_per_call(monkeypatch):
    spec = model_size("tiny", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2)
    model = omnimae_pretrain(spec, img_size=32, num_frames=4)
    args = argparse.Namespace(img_size=32, num_frames=4, mask_ratios=dict(PAPER_MASK_RATIO))
    _, n_visible = per_sample_counts(spec, args)
    loss_fn = OursLoss(model, n_visible)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    fn = loss_fn.compile("step", "reduce-overhead", backend="eager")  # the wrapper, without CUDA graphs
    (x, mask), = synthetic_batches("image", 2, 32, 4, spec.patch_size, 0.9, "cpu", count=1)
    expected = loss_fn.eager(x, mask, False)
    assert torch.allclose(fn(x, mask, False), expected) and fn(x, mask, False) is not None
    assert len(marks) == 2 and loss_fn.fastest is fn
    assert loss_fn.compile("step", None, backend="eager") is not fn  # no wrapper without CUDA graphs


def test_padded_decoder_attention_shapes():
    spec = model_size("base", decoder_attn_head_pad_to=64)
    args = argparse.Namespace(img_size=224, num_frames=16, mask_ratios=dict(PAPER_MASK_RATIO))
    shapes = attention_shapes(spec, args, {"image": 8})
    assert shapes[("decoder", "image")] == (8, 16, 196, 64) and shapes[("encoder", "image")] == (8, 12, 20, 64)


def test_reduce_overhead_compile_on_cpu_runs_without_cuda_graphs(tiny, capsys):
    result = omnimae_pl.bench.main([*tiny, "--modality", "image", "--compile", "--no-eager", "--compile-mode",
                                    "reduce-overhead", "--compile-backend", "aot_eager", "--decoder-head-pad", "16"])
    (r,) = result["rows"]
    assert r["compiled"] == "blocks" and torch.isfinite(torch.tensor(r["loss"])) and r["recompiles"] == 0
    info = result["info"]
    assert info["compile_mode"] == "default" and info["compile_backend"] == "aot_eager"
    assert "compiles without it" in info["compile_note"] and info["decoder_attn_head_pad_to"] == 16
    assert "note: --compile-mode reduce-overhead" in capsys.readouterr().out


@pytest.mark.parametrize("modality", ["image", "video"])
def test_decoder_head_pad_leaves_the_losses_as_they_were(tiny, modality):
    """Same seed, same init and batches: the padded decoder's timed losses are the unpadded ones."""
    args = [*tiny, "--modality", modality, "--steps", "2"]
    plain = omnimae_pl.bench.main(args)["rows"][0]
    padded = omnimae_pl.bench.main([*args, "--decoder-head-pad", "16"])["rows"][0]
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert padded["gflops_per_sample"] == plain["gflops_per_sample"]  # MFU counts the true head size's FLOPs

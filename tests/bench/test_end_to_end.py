"""``--end-to-end`` through the project's pipeline on a demo corpus written at test time."""

from __future__ import annotations

import pytest
import torch

import omnimae_pl.bench
from omnimae_pl.data.demo import build_demo_data


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_demo")
    build_demo_data(root, train_images_per_class=3, val_images_per_class=1, num_videos=12, video_size=(64, 48))
    return root


def test_project_pipeline_without_a_trainer(tiny, demo_root):
    result = omnimae_pl.bench.main([*tiny, "--end-to-end", "--data-root", str(demo_root)])
    (e2e,) = [r for r in result["rows"] if r["impl"] == "ours-e2e"]
    assert e2e["data"].startswith(f"project pipeline: demo corpus at {demo_root}")
    assert sum(e2e["samples"].values()) == 2 and e2e["samples_per_s"] > 0  # one timed step of batch 2
    assert e2e["batch"] == {"image": 2, "video": 2}
    # the host's time per step, split where it goes (what tells a loader-bound run from a device-bound one)
    host = e2e["host_ms_per_step"]
    assert list(host) == ["data_wait", "to_device", "step", "final_sync"] and min(host.values()) >= 0
    assert sum(host.values()) == pytest.approx(e2e["step_ms"], rel=0.01)
    assert host["step"] > 0  # a CPU step is synchronous: its compute is host time


def test_loader_masks_follow_the_mask_ratio_options(tiny, demo_root):
    result = omnimae_pl.bench.main([*tiny, "--modality", "image", "--image-mask-ratio", "0.5", "--end-to-end",
                                    "--data-root", str(demo_root)])
    assert result["info"]["n_visible"]["image"] == 2  # 4 tokens at 32 px, half of them hidden
    assert result["rows"][-1]["modality"] == "image"


def test_batches_go_through_the_datamodules_after_transfer_hook(tiny, demo_root, monkeypatch):
    """As under Lightning: the device copy, then ``on_after_batch_transfer`` (device-side augmentation)."""
    from omnimae_pl.data.datamodule import PretrainDataModule

    seen = []

    def hook(self, batch, dataloader_idx):
        seen.append((batch["input"].device.type, dataloader_idx))
        return batch

    monkeypatch.setattr(PretrainDataModule, "on_after_batch_transfer", hook)
    omnimae_pl.bench.main([*tiny, "--modality", "image", "--end-to-end", "--data-root", str(demo_root)])
    assert seen == [("cpu", 0)] * 4  # warm-up + 2, then one timed step


@pytest.mark.parametrize("modality", ["image", "video"])
def test_augment_on_device_runs_end_to_end(tiny, demo_root, modality):
    args = [*tiny, "--modality", modality, "--end-to-end", "--data-root", str(demo_root), "--augment-on", "device"]
    (e2e,) = [r for r in omnimae_pl.bench.main(args)["rows"] if r["impl"] == "ours-e2e"]
    assert e2e["data"].endswith("augment_on device") and e2e["samples"][modality] == 2
    assert torch.isfinite(torch.tensor(e2e["loss"]))


def test_image_decode_device_reaches_the_datamodule(tiny, demo_root, monkeypatch):
    from omnimae_pl.data import device_decode

    decoded = []
    plain = device_decode.decode_jpegs

    def counting(*args, **kwargs):
        out = plain(*args, **kwargs)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(device_decode, "decode_jpegs", counting)
    args = [*tiny, "--modality", "image", "--end-to-end", "--data-root", str(demo_root), "--augment-on", "device",
            "--image-decode", "device"]
    (e2e,) = [r for r in omnimae_pl.bench.main(args)["rows"] if r["impl"] == "ours-e2e"]
    assert e2e["data"].endswith("augment_on device, image_decode device")
    assert decoded and torch.isfinite(torch.tensor(e2e["loss"]))

"""``--end-to-end`` through the project's pipeline on a demo corpus written at test time."""

from __future__ import annotations

import pytest

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


def test_loader_masks_follow_the_mask_ratio_options(tiny, demo_root):
    result = omnimae_pl.bench.main([*tiny, "--modality", "image", "--image-mask-ratio", "0.5", "--end-to-end",
                                    "--data-root", str(demo_root)])
    assert result["info"]["n_visible"]["image"] == 2  # 4 tokens at 32 px, half of them hidden
    assert result["rows"][-1]["modality"] == "image"

"""notebooks/reconstruction.ipynb runs headless end to end, on tiny settings: it builds a small demo corpus,
pretrains the demo model for a few steps through the CLI, and draws its figures (inline and as files)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "reconstruction.ipynb"
KERNEL = "omnimae-pl-notebook-test"
PARAMETERS = (
    "checkpoint", "demo_root", "make_demo_if_missing", "demo_max_steps", "image_paths", "video_paths",
    "mask_ratios", "mask_types", "seed", "out_dir",
)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))


def test_notebook_is_clean_and_parametrised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is parameters_cell(nb), "the first code cell is the papermill `parameters` cell"
    defaults: dict = {}
    exec(code[0].source, {}, defaults)
    assert set(PARAMETERS) <= set(defaults)
    assert defaults["checkpoint"] == "runs/demo/checkpoints/last.ckpt" and defaults["make_demo_if_missing"] is True
    assert defaults["mask_ratios"] == [0.5, 0.75, 0.9]
    assert defaults["mask_types"] == ["random", "tube", "frame", "causal"]
    assert defaults["image_paths"] == [] and defaults["video_paths"] == []
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"


def test_notebook_runs_headless_on_tiny_settings(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out_dir = tmp_path / "figures"
    parameters_cell(nb).source = "\n".join(
        [
            f"checkpoint = {str(checkpoint)!r}",
            f"demo_root = {str(tmp_path / 'demo')!r}",
            "make_demo_if_missing = True",
            "demo_max_steps = 2",
            "demo_fit_args = ['--data.init_args.image_batch_size', '4', '--data.init_args.video_batch_size', '4',"
            " '--data.init_args.replicas', '2', '--data.init_args.num_workers', '0']",
            "demo_data_args = dict(train_images_per_class=2, val_images_per_class=1, num_videos=14,"
            " video_size=(64, 48))",
            "image_paths = []",
            "video_paths = []",
            "num_demo_images = 2",
            "mask_ratios = [0.9]",
            "mask_types = ['random', 'tube']",
            "seed = 0",
            f"out_dir = {str(out_dir)!r}",
        ]
    )
    # The kernel is this interpreter whatever kernels the machine has: a kernelspec of our own, found first through
    # JUPYTER_PATH. It inherits the environment: offline, quiet wandb.
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    start = time.perf_counter()
    NotebookClient(
        nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    elapsed = time.perf_counter() - start

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    gifs = [o for o in outputs if o.output_type == "display_data" and "image/gif" in o.data]
    # images (of random and tube, only random applies): normalisation, overview, six views; video: 2 x (overview, strip)
    assert len(pngs) == 7, [o.output_type for o in outputs]
    assert len(gifs) == 2
    assert not [o for o in outputs if o.output_type == "error"]
    assert checkpoint.is_file()

    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(
        [
            "images_normalisation_random_90.png", "images_overview_random.png", "images_views_random_90.png",
            "video0_overview_random.png", "video0_overview_tube.png",
            "video0_strip_random_90.png", "video0_strip_tube_90.png",
        ]
    )
    assert sorted(p.name for p in out_dir.glob("*.gif")) == ["video0_random_90.gif", "video0_tube_90.gif"]
    images = json.loads((out_dir / "files" / "images" / "index.json").read_text())["entries"]
    videos = json.loads((out_dir / "files" / "videos" / "index.json").read_text())["entries"]
    assert [(e["kind"], e["mask_type"]) for e in images] == [("image", "random")] * 2
    assert [(e["kind"], e["mask_type"]) for e in videos] == [("video", "random"), ("video", "tube")]
    assert (out_dir / "files" / "videos" / "index.html").is_file()
    print(f"notebook executed in {elapsed:.0f} s")


def test_image_grid_puts_every_image_in_one_labelled_figure(tmp_path):
    """``reconstruct.write_image_grid`` / ``--image-grid``: the README's image picture."""
    import numpy as np
    import torch
    from PIL import Image

    from omnimae_pl.models import omnimae_pretrain
    from omnimae_pl.reconstruct import main, write_image_grid

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"photo{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    torch.manual_seed(0)
    model = omnimae_pretrain("tiny", img_size=32, num_frames=4, depth=2, decoder_depth=1, patch_size=(2, 8, 8))
    grid = write_image_grid(model.eval(), paths, tmp_path / "grid.png", mask_ratio=0.75)
    with Image.open(grid) as picture:
        width, height = picture.size
    assert width > 1000 and 0.3 < height / width < 0.8  # six views wide, three images tall (plus labels)
    with pytest.raises(ValueError, match="images only"):
        write_image_grid(model, [torch.randn(3, 4, 32, 32)], tmp_path / "video.png")

    ckpt = tmp_path / "model.ckpt"  # the layout of our Lightning pretraining checkpoints
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
         "hyper_parameters": {"size": "tiny", "img_size": 32, "num_frames": 4,
                              "model_overrides": {"depth": 2, "decoder_depth": 1, "patch_size": (2, 8, 8)}}},
        ckpt,
    )
    main(["--checkpoint", str(ckpt), "--inputs", *map(str, paths[:2]), "--out-dir", str(tmp_path / "cli"),
          "--mask-ratios", "0.9", "--mask-types", "random", "causal", "--image-grid", "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "cli").glob("image_grid_*.png")) == [
        "image_grid_causal_90.png", "image_grid_random_90.png"
    ]

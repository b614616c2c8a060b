"""write_reconstructions on real files, and the CLI on released-format and Lightning checkpoints."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from omnimae_pl.cli import main as cli_main
from omnimae_pl.errors import EXIT_USER_ERROR
from omnimae_pl.models import omnimae_pretrain
from omnimae_pl.models.checkpoints import load_pretrain_model
from omnimae_pl.reconstruct import main, model_layout, write_reconstructions

TINY = dict(depth=2, decoder_depth=1, patch_size=(2, 8, 8))

# ours -> official prefix (the inverse of omnimae_pl.models.official's mapping), most specific first
TO_OFFICIAL = (
    ("encoder.patch_embed.proj.", "trunk.patch_embed.proj.1."),
    ("encoder.pos_embed", "trunk.pos_embed"),
    ("encoder.blocks.", "trunk.blocks."),
    ("encoder.norm.", "trunk.norm."),
    ("decoder.mask_token", "trunk.mask_token"),
    ("decoder.blocks.", "trunk.decoder.decoder_blocks."),
    ("decoder.pred.", "head."),
    ("decoder.", "trunk.decoder."),
)


def tiny_model(num_frames: int = 4):
    torch.manual_seed(0)
    return omnimae_pretrain("tiny", img_size=32, num_frames=num_frames, **TINY).eval()


def to_official(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        old, new = next((o, n) for o, n in TO_OFFICIAL if key.startswith(o))
        out[new + key[len(old) :]] = value
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real JPEG (a photo-like gradient with shapes) and a real 12-frame VP9 WebM with a moving square."""
    root = tmp_path_factory.mktemp("inputs")
    yy, xx = np.mgrid[0:60, 0:80]
    photo = np.stack([xx * 3, yy * 4, 255 - xx * 3], axis=-1).clip(0, 255).astype(np.uint8)
    photo[20:40, 30:50] = (250, 220, 30)
    jpeg = root / "photo.jpg"
    Image.fromarray(photo).save(jpeg, quality=90)

    webm = root / "clip.webm"
    with av.open(str(webm), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for t in range(12):
            frame = np.full((48, 64, 3), 40, dtype=np.uint8)
            frame[10:30, 4 * t : 4 * t + 16] = (255, 80, 20)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return jpeg, webm


def test_write_reconstructions_on_a_jpeg_a_webm_and_a_tensor(files, tmp_path):
    jpeg, webm = files
    model = tiny_model()
    tensor = torch.randn(3, 32, 32)
    index = write_reconstructions(model, [jpeg, webm, tensor], tmp_path / "out", mask_ratios=(0.5, 0.75))
    data = json.loads(index.read_text())
    entries = data["entries"]
    assert [(e["kind"], e["mask_ratio"]) for e in entries] == [
        ("image", 0.5), ("image", 0.75), ("video", 0.5), ("video", 0.75), ("image", 0.5), ("image", 0.75)
    ]
    assert entries[0]["input"] == str(jpeg) and entries[3]["num_masked"] == 24 and entries[3]["num_tokens"] == 32
    for e in entries:
        expected = {"png"} if e["kind"] == "image" else {"png", "gif", "mp4"}
        assert set(e["files"]) == expected
        for name in e["files"].values():
            assert (tmp_path / "out" / name).stat().st_size > 0
        assert np.isfinite(e["loss"])
        assert 0 < e["pixel_error_stitched"] and 0 < e["pixel_error_stitched_blank"]
    with Image.open(tmp_path / "out" / entries[2]["files"]["gif"]) as gif:
        assert gif.n_frames == 4
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f'src="{e["files"]["png"]}"' in page for e in entries)
    assert "borrows the hidden patches" in page and set(data["views"]) >= {"pred_denorm", "pasted", "pred_stitched"}
    assert model.training is False


def test_cli_on_a_released_format_state_dict(files, tmp_path):
    jpeg, webm = files
    model = tiny_model(num_frames=16)  # a released file's layout is read from its table size: 16 frames if it fits
    path = tmp_path / "omnimae_tiny_pretrain.torch"
    torch.save(to_official(model.state_dict()), path)
    loaded = load_pretrain_model(path)
    assert model_layout(loaded) == (32, 16)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    index = main(["--checkpoint", str(path), "--inputs", str(jpeg), str(webm), "--out-dir", str(tmp_path / "o"),
                  "--mask-ratios", "0.9", "--mask-types", "tube", "--device", "cpu"])
    entries = json.loads(index.read_text())["entries"]
    summary = [(e["kind"], e["mask_type"], e["num_masked"]) for e in entries]
    assert summary == [("image", "tube", 14), ("video", "tube", 112)]
    assert all((tmp_path / "o" / name).is_file() for e in entries for name in e["files"].values())


def test_a_missing_input_is_a_one_line_error_before_the_checkpoint_loads(files, tmp_path, capsys):
    jpeg, _ = files
    missing = tmp_path / "no_such.JPEG"
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist either: it is never read
        cli_main(["reconstruct", "--checkpoint", str(tmp_path / "none.ckpt"), "--inputs", str(jpeg), str(missing),
                  "--out-dir", str(tmp_path / "o")])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [f"omnimae-cli: error: --inputs: no such file: {missing}"]


def test_lightning_checkpoint_loads_with_its_hyper_parameters(tmp_path):
    model = tiny_model()
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"size": "tiny", "img_size": 32, "num_frames": 4, "model_overrides": TINY},
        },
        path,
    )
    loaded = load_pretrain_model(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

"""No file a user names can run code: a pickle whose ``__reduce__`` would create a marker file is refused by
every entry point that reads weights, with one error naming the file, and the marker never appears."""

from __future__ import annotations

import pathlib

import pytest
import torch
import yaml
from cli_helpers import DEMO, REPO, run_config

from omnimae_pl.cli import main
from omnimae_pl.errors import EXIT_USER_ERROR
from omnimae_pl.export import export_hub, export_timm, load_timm
from omnimae_pl.models import load_official, omnimae_pretrain
from omnimae_pl.models.checkpoints import CheckpointError, load_checkpoint, load_pretrain_model, read_weights
from omnimae_pl.tasks.finetune import OmniMAEFinetune

REFUSED = "holds Python objects other than tensors"


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def evil(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(a Lightning-style checkpoint of a real tiny model with a payload beside its weights, the marker path)."""
    marker = tmp_path / "payload_ran"
    model = omnimae_pretrain("tiny", img_size=32, num_frames=4, depth=2, patch_size=(2, 8, 8))
    path = tmp_path / "ckpt" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"size": "tiny", "img_size": 32, "num_frames": 4},
                "wandb_run_id": _Payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize(
    "read",
    [load_checkpoint, load_official, load_pretrain_model, read_weights, load_timm,
     lambda p: export_timm(p, p.with_name("out.pth")), lambda p: export_hub(p, p.with_name("hub")),
     lambda p: OmniMAEFinetune(size="tiny", num_classes=3, img_size=32, num_frames=4, init_from=str(p))],
    ids=["load_checkpoint", "load_official", "load_pretrain_model", "read_weights", "load_timm", "export_timm",
         "export_hub", "init_from"],
)
def test_python_entry_points_refuse(evil, read):
    path, marker = evil
    with pytest.raises(CheckpointError, match=f"{path}: refused: it {REFUSED}"):
        read(path)
    assert not marker.exists()


def _refused_by_cli(args: list[str], path: pathlib.Path, marker: pathlib.Path, capsys) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_USER_ERROR
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("omnimae-cli: error: ") and str(path) in message and REFUSED in message
    assert not marker.exists()


def test_tools_refuse(evil, tmp_path, demo_root, capsys):
    path, marker = evil
    image = next((demo_root / "imagenet" / "val").rglob("*.JPEG"))
    _refused_by_cli(["reconstruct", "--checkpoint", str(path), "--inputs", str(image), "--out-dir",
                     str(tmp_path / "recon")], path, marker, capsys)
    _refused_by_cli(["export", str(path), str(tmp_path / "out.pth")], path, marker, capsys)
    _refused_by_cli(["export", str(path), str(tmp_path / "hub"), "--format", "hub"], path, marker, capsys)


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_ckpt_path_file_and_last_are_refused(evil, tmp_path, demo_root, subcommand, capsys):
    path, marker = evil
    cfg = run_config(demo_root, tmp_path)  # its ModelCheckpoint writes to tmp_path/ckpt: `last` is the evil file
    for ckpt_path in (str(path), "last"):
        args = [subcommand, "--config", DEMO, "--config", str(cfg), "--ckpt_path", ckpt_path]
        _refused_by_cli(args, path, marker, capsys)


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("config", ["demo.yaml", "linear_probe.yaml"])
def test_init_from_through_the_cli_is_refused(evil, tmp_path, demo_root, subcommand, config, capsys):
    """Fine-tuning, evaluation and the linear probe start from ``model.init_from``: refused before any step."""
    path, marker = evil
    layer = tmp_path / "layer.yaml"
    layer.write_text(yaml.safe_dump({
        "model": {"init_args": {"size": "tiny", "model_overrides": {"depth": 2}, "init_from": str(path)}},
        "data": {"init_args": {
            "source": {"name": "imagenet_demo", "kind": "imagenet", "root": str(demo_root / "imagenet"),
                       "annotations": None, "val_split": "val"},
            "img_size": 32, "num_frames": 4, "patch_size": [2, 8, 8], "num_workers": 0, "persistent_workers": False}},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False, "callbacks": [],
                    "max_steps": 1},
    }))
    base = REPO / "configs" / "finetune" / config
    _refused_by_cli([subcommand, "--config", str(base), "--config", str(layer)], path, marker, capsys)


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\nabc\n")
    with pytest.raises(CheckpointError, match=f"{path}: not a PyTorch checkpoint"):
        load_checkpoint(path)

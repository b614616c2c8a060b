"""A configuration mistake stops ``omnimae-cli`` before any training step with one line on stderr: the full key
and what is accepted, exit 2, no traceback, no dump of the config.

Every mistake runs in-process through ``omnimae_pl.cli.main`` on the demo configs layered with test data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli_helpers import DEMO, REPO, run_config

from omnimae_pl.cli import main
from omnimae_pl.errors import EXIT_USER_ERROR
from omnimae_pl.tasks.finetune import OmniMAEFinetune
from omnimae_pl.tasks.pretrain import OmniMAEPretrain

FINETUNE_DEMO = str(REPO / "configs" / "finetune" / "demo.yaml")
D, M = "data.init_args", "model.init_args"
MASK_TYPES = "('random', 'tube', 'frame', 'causal')"


@dataclass
class Mistake:
    """``args`` (or ``make(tmp_path, demo_root)`` for mistakes that need files) added to a working ``fit`` command
    of ``task``; ``says``: what the error line must hold, the full key first, then the accepted values."""

    name: str
    says: tuple[str, ...]
    args: tuple[str, ...] = ()
    make: Callable[[Path, Path], list[str]] | None = None
    task: str = "pretrain"


def _ssv2(demo_root: Path) -> dict:
    return {"name": "ssv2_demo", "kind": "ssv2", "root": str(demo_root / "ssv2" / "videos"),
            "annotations": str(demo_root / "ssv2"), "val_split": "validation"}


def _sources(demo_root: Path, **changes: dict) -> list[str]:
    """The pretraining sources of ``run_config`` as a command-line list, with ``changes`` by position (s0, s1)."""
    sources = [
        {"name": "imagenet_demo", "kind": "imagenet", "root": str(demo_root / "imagenet"), "val_split": "val"},
        _ssv2(demo_root),
    ]
    for position, change in changes.items():
        sources[int(position[1:])].update(change)
    return [f"--{D}.sources", json.dumps(sources)]


def _empty_imagenet(tmp_path: Path, demo_root: Path) -> list[str]:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    return _sources(demo_root, s0={"root": str(tmp_path / "empty")})


def _mismatched_annotations(tmp_path: Path, demo_root: Path) -> list[str]:
    labels = shutil.copytree(demo_root / "ssv2", tmp_path / "labels", ignore=shutil.ignore_patterns("videos"))
    (labels / "something-something-v2-labels.json").write_text(json.dumps({"Pushing something": "0"}))
    return _sources(demo_root, s1={"annotations": str(labels)})


def _text_init_from(tmp_path: Path, demo_root: Path) -> list[str]:
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    return [f"--{M}.init_from", str(tmp_path / "notes.txt")]


MISTAKES = [
    # the trainer
    Mistake("no schedule length", ("trainer.max_epochs=-1", "trainer.max_steps=-1", "trainer.max_steps to a number"),
            ("--trainer.max_epochs", "-1", "--trainer.max_steps", "-1")),
    Mistake("bf16 on a CPU", ("trainer.precision='bf16-mixed'", "20-60x slower", "32-true"),
            ("--trainer.precision", "bf16-mixed")),
    Mistake("bf16 on a CPU, fine-tuning", ("trainer.precision='bf16-mixed'", "32-true"),
            ("--trainer.precision", "bf16-mixed"), task="finetune"),
    # the schedule and the optimiser
    Mistake("warmup_fraction 1.5", (f"{M}.warmup_fraction=1.5", "[0, 1)"), (f"--{M}.warmup_fraction", "1.5")),
    Mistake("warmup_fraction negative", (f"{M}.warmup_fraction=-0.1", "[0, 1)"), (f"--{M}.warmup_fraction", "-0.1")),
    Mistake("negative base_lr", (f"{M}.base_lr=-0.001", "> 0"), (f"--{M}.base_lr", "-0.001")),
    Mistake("negative lr, fine-tuning", (f"{M}.lr=-0.001", "> 0"), (f"--{M}.lr", "-0.001"), task="finetune"),
    Mistake("label_smoothing 1", (f"{M}.label_smoothing=1.0", "[0, 1)"), (f"--{M}.label_smoothing", "1.0"),
            task="finetune"),
    Mistake("unknown layer_decay_rule", (f"{M}.layer_decay_rule", "'official', 'mae'"),
            (f"--{M}.layer_decay_rule", "timm"), task="finetune"),
    Mistake("negative drop_path_rate", (f"{M}.drop_path_rate=-0.1", "[0, 1)"), (f"--{M}.drop_path_rate", "-0.1"),
            task="finetune"),
    # the model
    Mistake("unknown model size", (f"{M}.size='giant'", "['base', 'huge', 'large', 'small', 'tiny']"),
            (f"--{M}.size", "giant")),
    Mistake("unknown model_overrides field", (f"{M}.model_overrides=", "unknown fields ['dpth']", "embed_dim"),
            (f"--{M}.model_overrides", "{dpth: 2}")),
    # (the reader calls any file it cannot unpickle safely "refused", a text file too)
    Mistake("init_from a text file", (f"{M}.init_from", "notes.txt"),
            make=_text_init_from, task="finetune"),
    # batches and geometry
    Mistake("replicas 0", (f"{D}.replicas=0", ">= 1"), (f"--{D}.replicas", "0")),
    Mistake("image_batch_size 0", (f"{D}.image_batch_size=0", ">= 1"), (f"--{D}.image_batch_size", "0")),
    Mistake("video_batch_size not a multiple of replicas", (f"{D}.video_batch_size=6", f"multiple of {D}.replicas=4"),
            (f"--{D}.video_batch_size", "6")),
    Mistake("a batch larger than the dataset", ("source 'imagenet_demo'", "never be used", "smaller batch size"),
            (f"--{D}.image_batch_size", "1000")),
    Mistake("img_size not a multiple of the patch", (f"{D}.img_size=36", "multiple of the patch's height and width 8"),
            (f"--{D}.img_size", "36")),
    Mistake("odd num_frames", (f"{D}.num_frames=5", "multiple of the patch's time size 2"),
            (f"--{D}.num_frames", "5")),
    Mistake("short_side below img_size", (f"{D}.short_side=16", f">= {D}.img_size 32"), (f"--{D}.short_side", "16")),
    Mistake("eval_num_crops 2", (f"{D}.eval_num_crops=2", "1 (centre) or 3"), (f"--{D}.eval_num_crops", "2"),
            task="finetune"),
    # masking, per modality
    Mistake("image mask ratio 1", (f"{D}.image_masking.ratio=1.0", "[0, 1)"), (f"--{D}.image_masking.ratio", "1.0")),
    Mistake("video mask ratio negative", (f"{D}.video_masking.ratio=-0.1", "[0, 1)"),
            (f"--{D}.video_masking.ratio", "-0.1")),
    Mistake("unknown mask_type", (f"{D}.video_masking.mask_type", MASK_TYPES.strip("()")),
            (f"--{D}.video_masking.mask_type", "blocks")),
    # the data
    Mistake("max_invalid_fraction 1.5", (f"{D}.max_invalid_fraction=1.5", "[0, 1]"),
            (f"--{D}.max_invalid_fraction", "1.5")),
    Mistake("train_fraction 0", (f"{D}.train_fraction=0.0", "(0, 1]"), (f"--{D}.train_fraction", "0"),
            task="finetune"),
    Mistake("train_fraction above 1", (f"{D}.train_fraction=1.5", "(0, 1]"), (f"--{D}.train_fraction", "1.5"),
            task="finetune"),
    Mistake("fine-tuning without a training split", (f"{D}.source.split=None", "training split"),
            make=lambda tmp, demo: [f"--{D}.source", json.dumps({**_ssv2(demo), "split": None})], task="finetune"),
    Mistake("missing dataset folder", (f"{D}.sources[0].root=", "nowhere", "must be an existing folder"),
            make=lambda tmp, demo: _sources(demo, s0={"root": str(tmp / "nowhere")})),
    Mistake("empty dataset folder", (f"{D}.sources[0] (imagenet 'imagenet_demo', split 'train')", "no class folders"),
            make=_empty_imagenet),
    Mistake("annotations that do not match labels.json", (f"{D}.sources[1] (ssv2 'ssv2_demo'", "not in",
                                                          "something-something-v2-labels.json"),
            make=_mismatched_annotations),
    Mistake("missing annotations folder", (f"{D}.sources[1].annotations=", "no_labels", "must be an existing folder"),
            make=lambda tmp, demo: _sources(demo, s1={"annotations": str(tmp / "no_labels")})),
    Mistake("not an SSv2 split", (f"{D}.sources[1].val_split='val'", "('train', 'validation', 'test')"),
            make=lambda tmp, demo: _sources(demo, s1={"val_split": "val"})),
    Mistake("unknown source kind",
            (f"{D}.sources[1].kind='kinetics'", "['imagenet', 'litdata', 'ssv2', 'video_folder']"),
            make=lambda tmp, demo: _sources(demo, s1={"kind": "kinetics"})),
    Mistake("two sources with one name", (f"{D}.sources[1].name='imagenet_demo'", "must differ"),
            make=lambda tmp, demo: _sources(demo, s1={"name": "imagenet_demo"})),
    Mistake("weight for one source only", (f"{D}.sources[].weight=[2.0, None]", "every trained source or for none"),
            make=lambda tmp, demo: _sources(demo, s0={"weight": 2.0}, s1={"weight": None})),
    Mistake("unknown video_backend", (f"{D}.video_backend", "'pyav', 'torchcodec', 'auto'"),
            (f"--{D}.video_backend", "decord")),
    # what the parser refuses
    Mistake("typo in an option name", ("num_workerz", "not accepted"), (f"--{D}.num_workerz", "0")),
    Mistake("wrong type", (f"{D}.image_batch_size", "Expected a <class 'int'>", "abc"),
            (f"--{D}.image_batch_size", "abc")),
    Mistake("missing config file", ("config", "does not exist", "nowhere.yaml"), ("--config", "/nowhere.yaml")),
]


@pytest.fixture
def fit_commands(demo_root: Path, tmp_path: Path) -> dict[str, list[str]]:
    """A working ``fit`` of each task on the test data: no logger, no callbacks, nothing written outside tmp_path."""
    quiet = {"logger": False, "callbacks": [], "default_root_dir": str(tmp_path)}
    pretrain = run_config(demo_root, tmp_path, **quiet)
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({
        "model": {"init_args": {"model_overrides": {"depth": 2}, "init_from": None}},
        "data": {"init_args": {
            "source": _ssv2(demo_root),
            "batch_size": 4, "eval_batch_size": 4, "img_size": 32, "num_frames": 4, "short_side": 36,
            "num_workers": 0, "persistent_workers": False,
            "train_transform": {"class_path": "omnimae_pl.data.video_augment.VideoFinetuneTransform",
                                "init_args": {"crop_size": 32, "short_side": 36, "rand_augment": None}},
        }},
        "trainer": {"max_steps": 2, "max_epochs": None, **quiet},
    }))
    return {"pretrain": ["fit", "--config", DEMO, "--config", str(pretrain)],
            "finetune": ["fit", "--config", FINETUNE_DEMO, "--config", str(finetune)]}


@pytest.fixture
def training_steps(monkeypatch) -> list[str]:
    """The training steps that ran: none may, for any mistake."""
    steps: list[str] = []
    for task in (OmniMAEPretrain, OmniMAEFinetune):
        monkeypatch.setattr(task, "training_step", lambda self, *args, task=task: steps.append(task.__name__))
    return steps


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_key(mistake, fit_commands, training_steps, demo_root, tmp_path, capsys):
    args = list(mistake.args) if mistake.make is None else mistake.make(tmp_path, demo_root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*fit_commands[mistake.task], *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("omnimae-cli: error: ")]
    assert len(errors) == 1, err
    # the error is the last line; the parser may add a pointer to --help after it
    assert lines[-1] == errors[0] or (lines[-2] == errors[0] and lines[-1].endswith("--help)")), err
    for part in mistake.says:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    assert "Traceback" not in err and "Namespace(" not in err and "class_path" not in err, err
    assert training_steps == []


def test_the_table_covers_the_keys_it_promises():
    """At least 25 distinct mistakes, each with a full key or file to name and something accepted to say."""
    assert len({m.name for m in MISTAKES}) == len(MISTAKES) >= 25
    assert all(len(m.says) >= 2 for m in MISTAKES)

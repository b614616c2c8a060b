"""Does pretraining help fine-tuning? The fine-tuning demo configs (``configs/finetune/demo.yaml``: the video
task, ``configs/finetune/demo_image.yaml``: the image task) run from a pretraining checkpoint and from random
initialisation, on a small labelled share of the demo training split, over several seeds; the table gives each
task's mean validation top-1 of the last step and whether the checkpoint beats random initialisation on it:

    omnimae-cli finetune-check --checkpoint runs/demo/checkpoints/last.ckpt --seeds 5

Each run is the shipped config as it is, except: ``data.train_fraction`` (class-balanced, the same labelled
items for both initialisations of a seed), a fixed number of optimizer steps with one validation at the end (the
last step's accuracy, not the best epoch's: no selection on the validation split), and no checkpoints.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from omnimae_pl.data.demo import demo_paths
from omnimae_pl.errors import UserError

CONFIGS = {"video": "configs/finetune/demo.yaml", "image": "configs/finetune/demo_image.yaml"}
# Optimizer steps of each run unless given: about 9-10 labelled items per class, and at 300 steps neither
# initialisation has converged on either task, so the seeds' spread hides any difference.
STEPS = {"video": 1000, "image": 1000}


@dataclass(frozen=True)
class Run:
    task: str
    init: str
    seed: int
    acc1: float


def finetune_layer(task: str, checkpoint: str | None, seed: int, fraction: float, steps: int, out_dir: Path,
                   data_root: str | None = None) -> dict:
    """The config layer over ``CONFIGS[task]`` for one run (``checkpoint`` None: random initialisation)."""
    data: dict = {"train_fraction": fraction, "seed": seed}
    if data_root is not None:
        data["source"] = demo_source(task, data_root)
    return {
        "seed_everything": seed,
        "model": {"init_args": {"init_from": checkpoint}},
        "data": {"init_args": data},
        "trainer": {
            "max_steps": steps, "max_epochs": None, "check_val_every_n_epoch": None, "val_check_interval": steps,
            "enable_progress_bar": False, "enable_checkpointing": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out_dir), "name": "csv"}},
            "callbacks": [],
        },
    }


def demo_source(task: str, data_root: str | Path) -> dict:
    """The demo corpus source of ``task`` under ``data_root`` (``omnimae-cli demo-data --root``)."""
    paths = demo_paths(data_root)
    if task == "image":
        return {"name": "imagenet_demo", "kind": "imagenet", "root": str(paths["imagenet"]), "val_split": "val"}
    return {"name": "ssv2_demo", "kind": "ssv2", "root": str(paths["ssv2_videos"]), "annotations": str(paths["ssv2"]),
            "val_split": "validation"}


def finetune(task: str, checkpoint: str | None, seed: int, fraction: float, steps: int, out_dir: Path,
             data_root: str | None = None) -> float:
    """Validation top-1 after fine-tuning ``task`` for ``steps`` steps (one in-process ``omnimae-cli fit``)."""
    from omnimae_pl.cli import run_cli  # the CLI imports every task: only when a run is made

    out_dir.mkdir(parents=True, exist_ok=True)
    layer = out_dir / "layer.yaml"
    layer.write_text(yaml.safe_dump(finetune_layer(task, checkpoint, seed, fraction, steps, out_dir, data_root)))
    cli = run_cli(["fit", "--config", CONFIGS[task], "--config", str(layer)])
    return float(cli.trainer.callback_metrics["val/acc1"])


def compare(inits: dict[str, str | None], tasks: Sequence[str], seeds: Sequence[int], fraction: float,
            steps: int | None, out_dir: Path, data_root: str | None = None) -> list[Run]:
    """Every (task, seed, init) run; ``inits`` maps a name to the checkpoint it starts from (None: random);
    ``steps`` None: each task's :data:`STEPS`."""
    for name, checkpoint in inits.items():
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise UserError(f"{name} checkpoint {checkpoint}: no such file (make demo writes runs/demo/checkpoints/last.ckpt)")
    runs = []
    for task in tasks:
        for seed in seeds:
            for name, checkpoint in inits.items():
                acc = finetune(task, checkpoint, seed, fraction, STEPS[task] if steps is None else steps,
                               out_dir / task / name / f"seed{seed}", data_root)
                runs.append(Run(task, name, seed, acc))
    return runs


def summarise(runs: Sequence[Run]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{task: {init: (mean, sample std, number of seeds)}}."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for task in dict.fromkeys(r.task for r in runs):
        for init in dict.fromkeys(r.init for r in runs if r.task == task):
            accs = [r.acc1 for r in runs if (r.task, r.init) == (task, init)]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            out.setdefault(task, {})[init] = (statistics.fmean(accs), std, len(accs))
    return out


def steps_text(tasks: Sequence[str], steps: int | None) -> str:
    """How many optimizer steps each task's runs take, for the printed headers."""
    if steps is not None:
        return f"{steps} steps"
    return ", ".join(f"{task} {STEPS[task]}" for task in tasks) + " steps"


def report(runs: Sequence[Run], reference: str = "random", verdicts: bool = True) -> tuple[list[str], bool]:
    """Markdown table lines (task rows, one column per initialisation: mean ± std over seeds, then a pass / FAIL
    column unless ``verdicts`` is False) and whether every other initialisation's mean beats ``reference``'s on
    every task."""
    table = summarise(runs)
    inits = list(dict.fromkeys(init for row in table.values() for init in row))
    result = " result |" if verdicts else ""
    lines = ["| task | " + " | ".join(inits) + " |" + result, "|---" * (len(inits) + 1 + verdicts) + "|"]
    passed = True
    for task, row in table.items():
        cells = [f"{row[i][0]:.3f} ± {row[i][1]:.3f} (n={row[i][2]})" if i in row else "-" for i in inits]
        ok = all(row[i][0] > row[reference][0] for i in row if i != reference) if reference in row else False
        passed &= ok
        lines.append(f"| {task} | " + " | ".join(cells) + " |" + (f" {'pass' if ok else 'FAIL'} |" if verdicts else ""))
    return lines, passed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli finetune-check",
        description="Fine-tune the demo video and image tasks on a labelled share from a pretraining checkpoint and "
        "from random initialisation over several seeds; print the mean top-1 of each.",
    )
    parser.add_argument("--checkpoint", default="runs/demo/checkpoints/last.ckpt", help="pretraining .ckpt")
    parser.add_argument("--tasks", nargs="+", choices=tuple(CONFIGS), default=["video", "image"])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    parser.add_argument("--fraction", type=float, default=0.15, help="labelled share of the training split")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of each fine-tuning run (default: 1000 for each task)")
    parser.add_argument("--data-root", default=None, help="the demo corpus, if not the configs' .cache/demo_data")
    parser.add_argument("--out-dir", default="runs/finetune_check", help="logs of every run, and results.json")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1 or args.seeds < 1 or (args.steps is not None and args.steps < 1):
        raise UserError("--fraction must be in (0, 1], --seeds and --steps at least 1")
    out = Path(args.out_dir)
    inits = {"pretrained": args.checkpoint, "random": None}
    runs = compare(inits, args.tasks, range(args.seeds), args.fraction, args.steps, out, args.data_root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    lines, passed = report(runs)
    print(f"Fine-tuning check: validation top-1 after {steps_text(args.tasks, args.steps)} on {args.fraction:.0%} "
          f"of the labels ({args.checkpoint} against random initialisation, seeds 0-{args.seeds - 1}):")
    print("\n".join(lines))
    print("the checkpoint beats random initialisation on every task" if passed
          else "the checkpoint does NOT beat random initialisation on every task")


if __name__ == "__main__":
    main()

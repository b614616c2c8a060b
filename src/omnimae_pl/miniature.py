"""The paper's claim in miniature (OmniMAE, Fig. 2): one model pretrained on images and videos together against
one pretrained on images only (as MAE) and one on videos only (as ST-MAE), each then fine-tuned on the demo image
task and the demo video task, with random initialisation as the floor:

    omnimae-cli miniature --out-dir runs/miniature          # make miniature

The three pretrainings are ``configs/demo.yaml`` with the same number of optimizer steps, recipe and
batches; only the sources differ (``images``: the ImageNet-format set, ``videos``: the SSv2-format set,
``both``: the two interleaved as the demo does). The fine-tunings are ``omnimae-cli finetune-check``'s runs
(:mod:`omnimae_pl.finetune_check`: the same labelled share, steps and seeds for every initialisation). It writes
``results.json``, ``miniature.md`` (the table) and ``miniature.png`` (a bar chart like Fig. 2), and logs the table
and chart to wandb with ``--wandb PROJECT``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import yaml

from omnimae_pl.errors import UserError
from omnimae_pl.finetune_check import CONFIGS, Run, compare, demo_source, report, summarise

DEMO = "configs/demo.yaml"
VARIANTS = {"images": ("image",), "videos": ("video",), "both": ("image", "video")}  # name -> pretraining tasks
VIDEO_WEIGHT = 1.5  # configs/demo.yaml's share of video steps when both are interleaved


def pretrain_layer(variant: str, steps: int, out_dir: Path, data_root: str) -> dict:
    """The config layer over ``configs/demo.yaml`` for one pretraining: its sources, ``steps`` optimizer steps
    with one validation at the end, a CSV log and ``out_dir/checkpoints/last.ckpt``."""
    sources = []
    for task in VARIANTS[variant]:
        source = demo_source(task, data_root)
        sources.append({**source, "weight": VIDEO_WEIGHT if task == "video" else 1.0})
    return {
        "data": {"init_args": {"sources": sources}},
        "trainer": {
            "max_steps": steps, "max_epochs": None, "check_val_every_n_epoch": None, "val_check_interval": steps,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out_dir), "name": "csv"}},
            "callbacks": [
                {"class_path": "omnimae_pl.callbacks.ResumableCheckpoint",
                 "init_args": {"dirpath": str(out_dir / "checkpoints"), "every_n_train_steps": steps}},
                {"class_path": "omnimae_pl.callbacks.learning_report.LearningReport", "init_args": {"max_ratio": 0.9}},
            ],
        },
    }


def pretrain(variant: str, steps: int, out_dir: Path, data_root: str) -> tuple[str, dict[str, float]]:
    """One pretraining run (in-process ``omnimae-cli fit``) -> (its last.ckpt, {modality: val loss / baseline})."""
    from omnimae_pl.cli import run_cli  # the CLI imports every task: only when a run is made

    out_dir.mkdir(parents=True, exist_ok=True)
    layer = out_dir / "layer.yaml"
    layer.write_text(yaml.safe_dump(pretrain_layer(variant, steps, out_dir, data_root)))
    cli = run_cli(["fit", "--config", DEMO, "--config", str(layer)])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    ratios = {m: metrics[f"val/loss_{m}"] / metrics[f"val/loss_{m}_baseline"] for m in ("image", "video")
              if f"val/loss_{m}" in metrics}
    return str(out_dir / "checkpoints" / "last.ckpt"), ratios


def table(runs: list[Run], ratios: dict[str, dict[str, float]], steps: int) -> list[str]:
    """The markdown of the comparison: fine-tuning top-1 per pretraining, then each pretraining's own losses."""
    lines, _ = report(runs, verdicts=False)  # the table is read, not passed
    lines += ["", f"Pretraining ({steps} steps each), validation loss / baseline (lower: learnt more):", "",
              "| pretraining | image | video |", "|---|---|---|"]
    for variant, r in ratios.items():
        lines.append(f"| {variant} | " + " | ".join(f"{r[m]:.3f}" if m in r else "-" for m in ("image", "video")) + " |")
    return lines


def bar_chart(runs: list[Run], path: Path) -> Path:
    """Fig. 2's shape: one group of bars per fine-tuning task, one bar per initialisation, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(runs)
    tasks = list(summary)
    inits = list(dict.fromkeys(r.init for r in runs))
    width = 0.8 / len(inits)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    for k, init in enumerate(inits):
        means = [summary[t][init][0] * 100 for t in tasks]
        stds = [summary[t][init][1] * 100 for t in tasks]
        xs = [i + (k - (len(inits) - 1) / 2) * width for i in range(len(tasks))]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=init)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(tasks)), [f"demo {t} task" for t in tasks])
    ax.set_ylabel("fine-tuning top-1 (%)")
    ax.set_ylim(0, 110)  # room for the labels of bars near 100 %
    # beside the axes: inside, it covered the labels of the tallest bars
    ax.legend(title="pretrained on", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    n = max(s[2] for row in summary.values() for s in row.values())
    ax.set_title(f"OmniMAE Fig. 2 in miniature (mean ± std of {n} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_to_wandb(project: str, out_dir: Path, runs: list[Run], chart: Path, config: dict) -> None:
    import wandb

    # create_new: wandb.init would otherwise hand back a run already active in this process (a notebook's, a
    # logger's), which would then receive the miniature's table and be finished by it
    run = wandb.init(project=project, dir=str(out_dir), config=config, job_type="miniature",
                     mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
    rows = [[r.task, r.init, r.seed, r.acc1] for r in runs]
    run.log({"miniature/runs": wandb.Table(columns=["task", "pretraining", "seed", "acc1"], data=rows),
             "miniature/chart": wandb.Image(str(chart))})
    for task, row in summarise(runs).items():
        for init, (mean, _, _) in row.items():
            run.summary[f"miniature/{task}/{init}"] = mean
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli miniature",
        description="OmniMAE's Fig. 2 in miniature: pretrain on images only, videos only and both with the same "
        "budget, fine-tune each (and random initialisation) on the demo image and video tasks, chart the top-1.",
    )
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps of each pretraining")
    # 2: with 1000-step fine-tunings, 3 seeds take about 65 minutes on a 2-core CPU (docs/miniature.md)
    parser.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds per task and pretraining")
    parser.add_argument("--fraction", type=float, default=0.15, help="labelled share of each fine-tuning task")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="optimizer steps of each fine-tuning (default: finetune-check's, 1000 for each task)")
    parser.add_argument("--data-root", default=".cache/demo_data", help="the demo corpus (omnimae-cli demo-data)")
    parser.add_argument("--out-dir", default="runs/miniature")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log the table and chart to this wandb project "
                        "(offline unless WANDB_MODE says otherwise)")
    args = parser.parse_args(argv)
    too_few = args.steps < 1 or args.seeds < 1 or (args.finetune_steps is not None and args.finetune_steps < 1)
    if too_few or not 0 < args.fraction <= 1:
        raise UserError("--steps, --seeds and --finetune-steps must be at least 1 and --fraction in (0, 1]")
    if not Path(args.data_root).is_dir():
        raise UserError(f"--data-root {args.data_root}: no demo corpus; run omnimae-cli demo-data --root {args.data_root}")
    out = Path(args.out_dir)
    checkpoints, ratios = {}, {}
    for variant in VARIANTS:
        checkpoints[variant], ratios[variant] = pretrain(variant, args.steps, out / "pretrain" / variant, args.data_root)
    inits = {**checkpoints, "random": None}
    runs = compare(inits, list(CONFIGS), range(args.seeds), args.fraction, args.finetune_steps, out / "finetune",
                   args.data_root)
    lines = table(runs, ratios, args.steps)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "pretraining_ratios": ratios,
                                                  "runs": [asdict(r) for r in runs]}, indent=1))
    (out / "miniature.md").write_text("\n".join(lines) + "\n")
    chart = bar_chart(runs, out / "miniature.png")
    if args.wandb:
        log_to_wandb(args.wandb, out, runs, chart, vars(args))
    print(f"Fig. 2 in miniature: fine-tuning top-1 on {args.fraction:.0%} of the labels, {args.seeds} seeds "
          f"({out / 'miniature.md'}, {chart}):", *lines, sep="\n")


if __name__ == "__main__":
    main()

"""``omnimae-cli``: every command of the project behind one entry point.

``fit`` / ``validate`` / ``test`` / ``predict`` are one LightningCLI (the YAML picks pretraining or fine-tuning);
the tools in :data:`TOOLS` run as ``omnimae-cli <tool> ...``, each with its own ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from omnimae_pl.callbacks import WANDB_RUN_ID_KEY
from omnimae_pl.config_parser import OneLineErrorParser
from omnimae_pl.errors import find_user_error
from omnimae_pl.models.checkpoints import load_checkpoint

WANDB_OFFLINE = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "omnimae-pl", "save_dir": "runs", "offline": True},
}
# The datamodules shard and shuffle their data themselves (the interleaver), so Lightning must not add a sampler.
TRAINER_DEFAULTS = {"logger": WANDB_OFFLINE, "use_distributed_sampler": False}

# name -> (module with main(argv), one-line purpose): the one list of the commands a user runs besides LightningCLI's.
TOOLS = {
    "reconstruct": ("omnimae_pl.reconstruct", "write reconstruction pictures of images and videos from a checkpoint"),
    "export": ("omnimae_pl.export", "export weights for timm's VisionTransformer, or as a model-hub folder"),
    "data-check": ("omnimae_pl.data.check", "read every file a training config would use and report the unreadable ones"),
    "shards": ("omnimae_pl.data.shards", "write a folder source as litdata shards of its encoded files (kind: litdata)"),
    "demo-data": ("omnimae_pl.data.demo", "build the demo corpus (ImageNet and SSv2 layouts) from installed packages"),
    "bench": ("omnimae_pl.bench", "time the training step: samples/s, MFU, memory, eager vs compiled"),
    "loader-bench": ("omnimae_pl.data.loader_bench", "time the data loaders on one core"),
    "frozen-probe": ("omnimae_pl.frozen_probe", "linear probe of a checkpoint's frozen encoder against random ones (demo data)"),
    "finetune-check": ("omnimae_pl.finetune_check", "fine-tune the demo tasks from a checkpoint and from scratch, several seeds"),
    "miniature": ("omnimae_pl.miniature", "OmniMAE's Fig. 2 in miniature: images vs videos vs both, fine-tuned on each"),
}
LIGHTNING_COMMANDS = {
    "fit": "pretrain or fine-tune (the config's model class decides)",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split",
    "predict": "run the model over the predict split",
}


def commands_help() -> str:
    rows = [*LIGHTNING_COMMANDS.items(), *((name, purpose) for name, (_, purpose) in TOOLS.items())]
    width = max(len(name) for name, _ in rows)
    return "commands:\n" + "\n".join(f"  {name:<{width}}  {purpose}" for name, purpose in rows)


class OmniCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Data facts flow into the model; give them under `data`, never under `model`.
        for key in ("img_size", "num_frames", "patch_size", "num_classes"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """A ``--ckpt_path`` file (or ``last``) is read here first, safely: a refused file stops the run before
        anything is built. Resuming a fit continues the wandb run stored in it.

        Lightning's own version would load the file without this check and lay the checkpoint's hyper-parameters
        over the command line; here the config stays what the user wrote, for a file as for ``last``."""
        subcommand = self.config.get("subcommand")
        cfg = self.config.get(subcommand) if subcommand else None
        if cfg is None or not cfg.get("ckpt_path"):
            return
        path = _resolve_checkpoint(cfg)
        if path is None or not path.is_file():
            return
        run_id = load_checkpoint(path).get(WANDB_RUN_ID_KEY)
        if subcommand != "fit" or not run_id:
            return
        logger = cfg.trainer.get("logger")
        for lg in logger if isinstance(logger, list) else [logger]:
            if lg is not None and not isinstance(lg, bool) and lg.class_path.endswith("WandbLogger"):
                lg.init_args["id"] = run_id
                lg.init_args["resume"] = "allow"


def _resolve_checkpoint(cfg) -> Path | None:
    ckpt = str(cfg.ckpt_path)
    if ckpt not in ("last", "best", "hpc", "registry"):
        return Path(ckpt)
    if ckpt != "last":
        return None
    for cb in cfg.trainer.get("callbacks") or []:
        is_checkpoint = getattr(cb, "class_path", "").endswith(("ModelCheckpoint", "ResumableCheckpoint"))
        if is_checkpoint and cb.init_args.get("dirpath"):
            return Path(cb.init_args["dirpath"]) / "last.ckpt"
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``omnimae-cli`` and ``python -m omnimae_pl``."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(commands_help() + "\n\nomnimae-cli <command> --help shows a command's options.\n")
    try:
        if argv and argv[0] in TOOLS:
            importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
        else:
            run_cli(args)
    except Exception as err:
        mistake = find_user_error(err)
        if mistake is None:
            raise
        print(f"omnimae-cli: error: {mistake}", file=sys.stderr)
        sys.exit(mistake.exit_code)


def run_cli(args: list[str] | None = None, run: bool = True) -> OmniCLI:
    """The CLI in-process (tests, notebooks); returns it, so its trainer and model can be inspected."""
    # Given ``args``, LightningCLI warns about any sys.argv (finetune-check and miniature run it in-process): hide
    # the outer command's arguments while it parses.
    argv = sys.argv
    if args is not None:
        sys.argv = argv[:1]
    try:
        return OmniCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            parser_class=OneLineErrorParser,
            args=args,
            run=run,
        )
    finally:
        sys.argv = argv


if __name__ == "__main__":  # pragma: no cover
    main()

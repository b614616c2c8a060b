"""``omnimae-cli``: one LightningCLI for pretraining, fine-tuning and evaluation; the YAML picks the task."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from omnimae_pl.callbacks import WANDB_RUN_ID_KEY

WANDB_OFFLINE = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "omnimae-pl", "save_dir": "runs", "offline": True},
}


class OmniCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Data facts flow into the model; give them under `data`, never under `model`.
        for key in ("img_size", "num_frames", "num_classes"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Resuming with ``--ckpt_path``: continue the wandb run stored in that checkpoint."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None or self.subcommand != "fit" or not cfg.get("ckpt_path"):
            return
        path = _resolve_checkpoint(cfg)
        if path is None or not path.is_file():
            return
        run_id = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get(WANDB_RUN_ID_KEY)
        logger = cfg.trainer.get("logger")
        for lg in logger if isinstance(logger, list) else [logger]:
            if run_id and lg is not None and not isinstance(lg, bool) and lg.class_path.endswith("WandbLogger"):
                lg.init_args["id"] = run_id
                lg.init_args["resume"] = "allow"


def _resolve_checkpoint(cfg) -> Path | None:
    ckpt = str(cfg.ckpt_path)
    if ckpt not in ("last", "best", "hpc", "registry"):
        return Path(ckpt)
    if ckpt != "last":
        return None
    for cb in cfg.trainer.get("callbacks") or []:
        if getattr(cb, "class_path", "").endswith("ModelCheckpoint") and cb.init_args.get("dirpath"):
            return Path(cb.init_args["dirpath"]) / "last.ckpt"
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``omnimae-cli`` and ``python -m omnimae_pl``."""
    run_cli(args)


def run_cli(args: list[str] | None = None, run: bool = True) -> OmniCLI:
    """The CLI in-process (tests, notebooks); returns it, so its trainer and model can be inspected."""
    return OmniCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": WANDB_OFFLINE},
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

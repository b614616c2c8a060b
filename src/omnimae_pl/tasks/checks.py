"""What the tasks refuse before a step runs: arguments out of range, and a trainer that cannot run them well.

Each refusal is a :class:`~omnimae_pl.errors.ConfigError` naming the full config key (``model.init_args.base_lr``,
``trainer.precision``) and what is accepted: the arguments while the module is built, the trainer in ``setup``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator

from omnimae_pl.errors import ConfigError, check_value

MODEL = "model.init_args"  # where the CLI's config holds the task's arguments


def check_optimisation(hp: Mapping[str, Any]) -> None:
    """The optimisation arguments both tasks have."""
    check_value(hp["base_lr"] > 0, f"{MODEL}.base_lr", hp["base_lr"], "must be > 0 (the lr per 256 samples)")
    check_value(hp["weight_decay"] >= 0, f"{MODEL}.weight_decay", hp["weight_decay"], "must be >= 0")
    check_value(0 <= hp["warmup_fraction"] < 1, f"{MODEL}.warmup_fraction", hp["warmup_fraction"],
                "must be in [0, 1): the share of all steps spent warming up")
    check_value(hp["warmup_start_lr"] >= 0, f"{MODEL}.warmup_start_lr", hp["warmup_start_lr"], "must be >= 0")
    betas = list(hp["betas"])
    check_value(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"{MODEL}.betas", betas,
                "must be two numbers in [0, 1)")


def check_trainer(trainer: Trainer, stage: str) -> None:
    """16-bit precision on a CPU, and a fit without a length for the lr schedule."""
    precision = str(trainer.precision)
    if isinstance(trainer.accelerator, CPUAccelerator) and "16" in precision:
        raise ConfigError(
            f"trainer.precision={precision!r} on a CPU (trainer.accelerator cpu): 16-bit math is 20-60x slower than "
            "fp32 on CPUs; use trainer.precision 32-true"
        )
    epochs, steps = trainer.max_epochs, trainer.max_steps
    if stage == "fit" and (epochs or -1) <= 0 and (steps or -1) <= 0:
        raise ConfigError(
            f"trainer.max_epochs={epochs} with trainer.max_steps={steps}: the lr schedule needs a length; set "
            "trainer.max_epochs to a number of epochs >= 1 or trainer.max_steps to a number of steps >= 1"
        )

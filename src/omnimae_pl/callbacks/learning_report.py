"""Did the pretraining learn? At the end of ``fit``, the last validation's loss of each modality against what
predicting every hidden patch's mean scores (``_baseline``) and, for video, what copying each hidden patch from
the nearest visible time step scores (``_copy_nearest``), with a pass / fail per modality; where the run logs
them (``stitched_error``), whether the raw prediction carries the picture: its hidden-pixel error once stitched
from the visible pixels only, against a blank prediction's (:mod:`omnimae_pl.models.stitch`); on the demo data,
also the frozen linear probe of the trained encoder against random ones (:mod:`omnimae_pl.frozen_probe`)."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from omnimae_pl.errors import check_value

STAGE = "val"


def learning_report(metrics: dict[str, float], max_ratio: float) -> tuple[list[str], bool]:
    """Table lines for every modality with ``val/loss_<modality>`` and its baseline in ``metrics``, and whether
    all pass: loss <= ``max_ratio`` x baseline and, where the copy-nearest reference is there, loss below it."""
    lines = [f"  {'modality':<9}{'loss':>8}{'baseline':>10}{'ratio':>7}{'copy-nearest':>14}  target"]
    passed = True
    modalities = sorted(k[len(STAGE) + 6 : -9] for k in metrics if k.startswith(f"{STAGE}/loss_") and k.endswith("_baseline"))
    for modality in modalities:
        key = f"{STAGE}/loss_{modality}"
        if key not in metrics:
            continue
        loss, baseline, copy = metrics[key], metrics[f"{key}_baseline"], metrics.get(f"{key}_copy_nearest")
        ratio = loss / baseline if baseline > 0 else float("inf")
        ok = ratio <= max_ratio and (copy is None or loss < copy)
        passed &= ok
        target = f"ratio <= {max_ratio:g}" + ("" if copy is None else ", loss < copy-nearest")
        copy_text = "-" if copy is None else f"{copy:.4f}"
        lines.append(f"  {modality:<9}{loss:>8.4f}{baseline:>10.4f}{ratio:>7.3f}{copy_text:>14}  {target}: "
                     f"{'pass' if ok else 'FAIL'}")
    return lines, passed and bool(modalities)


def stitched_report(metrics: dict[str, float], max_ratio: float) -> tuple[list[str], bool]:
    """Table lines for every modality with ``val/pixel_error_<modality>_stitched`` and its ``_blank`` reference in
    ``metrics`` (none: no lines), and whether all pass: stitched error <= ``max_ratio`` x the blank one."""
    prefix, suffix = f"{STAGE}/pixel_error_", "_stitched_blank"
    modalities = sorted(k[len(prefix) : -len(suffix)] for k in metrics if k.startswith(prefix) and k.endswith(suffix))
    lines = [f"  {'modality':<9}{'stitched':>10}{'blank':>10}{'ratio':>7}  target"] if modalities else []
    passed = True
    for modality in modalities:
        stitched, blank = metrics.get(f"{prefix}{modality}_stitched"), metrics[f"{prefix}{modality}{suffix}"]
        if stitched is None:
            continue
        ratio = stitched / blank if blank > 0 else float("inf")
        ok = ratio <= max_ratio
        passed &= ok
        lines.append(f"  {modality:<9}{stitched:>10.4f}{blank:>10.4f}{ratio:>7.3f}  ratio <= {max_ratio:g}: "
                     f"{'pass' if ok else 'FAIL'}")
    return lines, passed and bool(modalities)


class LearningReport(Callback):
    """Prints :func:`learning_report` of the last validation once training ends (rank 0), saying at which step
    that validation ran, then :func:`stitched_report` where the run logged the stitched errors; nothing when the
    run never validated.

    Args:
        max_ratio: the largest ``loss / baseline`` (and stitched / blank pixel error) that passes (0.9: at least
            10 % below the reference).
        probe_data_root: the demo corpus (``omnimae-cli demo-data --root``): then the frozen linear probe runs
            too, on one process (under several it prints the ``omnimae-cli frozen-probe`` command instead).
    """

    def __init__(self, max_ratio: float = 0.9, probe_data_root: str | None = None) -> None:
        check_value(0 < max_ratio <= 1, "LearningReport.max_ratio", max_ratio, "must be in (0, 1]")
        self.max_ratio = max_ratio
        self.probe_data_root = probe_data_root
        self._metrics: dict[str, float] = {}
        self._step: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._step = trainer.global_step
        self._metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith((f"{STAGE}/loss_", f"{STAGE}/pixel_error_"))
        }

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._step is None:
            return
        lines, passed = learning_report(self._metrics, self.max_ratio)
        when = f"step {self._step} of {trainer.global_step}"
        verdict = "it learnt on every modality" if passed else "it did NOT learn on every modality"
        print("\n".join(["", f"Learning check (validation at {when}, fixed masks): {verdict}", *lines]), flush=True)
        lines, passed = stitched_report(self._metrics, self.max_ratio)
        if lines:
            verdict = "it carries the picture" if passed else "it does NOT carry the picture on every modality"
            print("\n".join([
                "Raw prediction stitched from the visible pixels only (hidden-pixel error against a stitched blank "
                f"prediction): {verdict}", *lines,
            ]), flush=True)
        if self.probe_data_root is None:
            return
        if trainer.world_size > 1:  # the encoder is sharded or replicated: probe the saved checkpoint instead
            print(f"Frozen linear probe: run omnimae-cli frozen-probe --data-root {self.probe_data_root} "
                  "--checkpoint <this run's last.ckpt>", flush=True)
            return
        from omnimae_pl.frozen_probe import compare_encoder, print_report  # data and models: only when asked

        workers = getattr(trainer.datamodule, "num_workers", 0)
        print_report(compare_encoder(pl_module.model, self.probe_data_root, workers=workers),
                     f"this run's encoder at step {trainer.global_step}")

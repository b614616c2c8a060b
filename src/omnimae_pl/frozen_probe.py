"""Does pretraining give better features than none? A frozen linear probe of a pretraining checkpoint's encoder
against the same probe on randomly initialised encoders of the same shape, on the demo data's image and video
tasks (``omnimae-cli demo-data``): ``omnimae-cli frozen-probe --checkpoint runs/demo/checkpoints/last.ckpt``;
``LearningReport(probe_data_root=...)`` runs it at the end of ``make demo``.

Features are what fine-tuning sees before its pooling: every token of the evaluation view (resize, centre crop,
no mask) through the encoder blocks, without the pretraining encoder's final norm (fine-tuning never loads it),
the whole token map concatenated. Not mean-pooled: the demo's labels are where the digit is over time and what
shape it has, and an encoder trained only to reconstruct was never taught to summarise that in a token average
(mean-pooled, a random encoder beats the demo checkpoint: docs/learning_check.md). Each feature is standardised
with the training split's statistics and a multinomial logistic regression is fitted on the whole training split
with full-batch L-BFGS (as CLIP's probes do, with a fixed L2 penalty), then scored on the validation split: no
augmentation and no lr to tune, so every encoder gets exactly the same probe and the comparison costs seconds.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from omnimae_pl.data.demo import demo_paths
from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.video_datasets import SSv2
from omnimae_pl.errors import UserError
from omnimae_pl.models.checkpoints import load_pretrain_model
from omnimae_pl.models.encoder import VisionTransformerEncoder, init_weights
from omnimae_pl.models.omnimae import OmniMAE
from omnimae_pl.reconstruct import model_layout

L2 = 1e-3  # the probe's penalty on the weights (per sample), the same for every encoder
RANDOM_SEEDS = (0, 1, 2)  # the pretrained encoder must beat the best of these


def random_encoder(encoder: VisionTransformerEncoder, seed: int) -> VisionTransformerEncoder:
    """A copy of ``encoder`` initialised afresh, as pretraining starts (PyTorch defaults, then the recipe's init)."""
    fresh = copy.deepcopy(encoder)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    init_weights(fresh)
    return fresh


@torch.no_grad()
def token_features(encoder: VisionTransformerEncoder, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, tokens x D) last-block token maps (no final norm), flattened, and (N,) labels of every readable sample."""
    probe = copy.deepcopy(encoder)
    probe.norm = nn.Identity()  # fine-tuning pools the blocks' output and never loads this norm
    probe.eval()
    device = next(probe.parameters()).device
    feats, labels = [], []
    for batch in loader:
        keep = batch["valid"].bool() & (batch["label"] >= 0)
        feats.append(probe(batch["input"][keep].to(device)).flatten(1).cpu())
        labels.append(batch["label"][keep])
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = L2, max_iter: int = 500,
) -> nn.Linear:
    """A multinomial logistic regression (float64) fitted from zero by full-batch L-BFGS, L2 on the weights only."""
    head = nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def logistic_probe(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
    l2: float = L2, max_iter: int = 500,
) -> float:
    """Validation accuracy of :func:`fit_logistic` on standardised features (train statistics)."""
    (x, y), (xv, yv) = train, val
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    x, xv = ((x - mean) / std).double(), ((xv - mean) / std).double()
    if x.shape[1] > x.shape[0]:
        # More features than samples (a video token map: 12288 features, 840 clips). Every gradient of the
        # weights, hence every L-BFGS iterate from zero and the optimum, lies in the span of the training
        # features, and the L2 penalty is the same in orthonormal coordinates of that span: the same fit, with
        # N columns instead of D (15x fewer, for the demo video probe).
        basis = torch.linalg.svd(x, full_matrices=False).Vh.T
        x, xv = x @ basis, xv @ basis
    head = fit_logistic(x, y, num_classes, l2, max_iter)
    with torch.no_grad():
        return (head(xv).argmax(dim=1) == yv).double().mean().item()


def demo_tasks(root: Path, img_size: int, num_frames: int, patch_size: tuple[int, int, int]) -> dict:
    """{modality: (train dataset, validation dataset)} of the demo corpus, evaluation views only."""
    paths = demo_paths(root)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise UserError(f"--data-root {root}: no demo data ({missing[0]} is missing); run omnimae-cli demo-data --root {root}")
    image = {"img_size": img_size, "patch_size": patch_size, "train": False}
    video = {"num_frames": num_frames, "crop_size": img_size, "short_side": img_size, "patch_size": patch_size,
             "train": False}
    return {
        "image": tuple(ImageNet(paths["imagenet"], split, **image) for split in ("train", "val")),
        "video": tuple(SSv2(paths["ssv2"], paths["ssv2_videos"], split, **video) for split in ("train", "validation")),
    }


def compare(checkpoint: str | Path, data_root: str | Path, seeds: Sequence[int] = RANDOM_SEEDS, workers: int = 0,
            modalities: tuple[str, ...] = ("image", "video")) -> dict[str, dict[str, float]]:
    """:func:`compare_encoder` of a pretraining checkpoint's encoder."""
    return compare_encoder(load_pretrain_model(checkpoint), data_root, seeds, workers, modalities)


def compare_encoder(model: OmniMAE, data_root: str | Path, seeds: Sequence[int] = RANDOM_SEEDS, workers: int = 0,
                    modalities: tuple[str, ...] = ("image", "video")) -> dict[str, dict[str, float]]:
    """{modality: {"pretrained": acc, "random <seed>": acc, ...}}: validation accuracies of the probe on the
    model's encoder and on a random encoder of each seed (left in train / eval mode as it was)."""
    trained = model.encoder
    randoms = {f"random {seed}": random_encoder(trained, seed) for seed in seeds}
    img_size, num_frames = model_layout(model)
    tasks = demo_tasks(Path(data_root), img_size, num_frames, trained.patch_size)
    results = {}
    for modality in modalities:
        loaders = [_loader(ds, modality, workers) for ds in tasks[modality]]
        num_classes = tasks[modality][0].num_classes
        results[modality] = {
            name: logistic_probe(*(token_features(encoder, loader) for loader in loaders), num_classes)
            for name, encoder in (("pretrained", trained), *randoms.items())
        }
    return results


def _loader(dataset: Dataset, modality: str, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=64, num_workers=workers,
                      collate_fn=functools.partial(collate_samples, modality=modality, source=modality))


def report(results: dict[str, dict[str, float]]) -> tuple[list[str], bool]:
    """The lines to print and whether the pretrained encoder beats every random one on every task."""
    lines = [f"  {'task':<8}{'pretrained':>12}{'best random':>13}{'margin':>9}  result"]
    passed = True
    for modality, acc in results.items():
        best = max(v for k, v in acc.items() if k != "pretrained")
        ok = acc["pretrained"] > best
        passed &= ok
        lines.append(f"  {modality:<8}{acc['pretrained']:>12.3f}{best:>13.3f}{acc['pretrained'] - best:>+9.3f}  "
                     f"{'pass' if ok else 'FAIL'}")
    return lines, passed


def print_report(results: dict[str, dict[str, float]], what: str) -> bool:
    """Print :func:`report` under a title naming ``what`` was probed; returns whether it passed."""
    lines, passed = report(results)
    randoms = len(next(iter(results.values()))) - 1
    verdict = "beat" if passed else "do NOT beat"
    print(f"Frozen linear probe, validation top-1 ({what} against {randoms} random encoders): pretrained features "
          f"{verdict} random ones", *lines, sep="\n", flush=True)
    return passed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli frozen-probe",
        description="Frozen linear probe (standardised token-map features, logistic regression) of a pretraining "
        "checkpoint's encoder against random encoders of the same shape, on the demo image and video tasks.",
    )
    parser.add_argument("--checkpoint", default="runs/demo/checkpoints/last.ckpt", help="pretraining .ckpt")
    parser.add_argument("--data-root", default=".cache/demo_data", help="the demo corpus (omnimae-cli demo-data)")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=list(RANDOM_SEEDS),
                        help="seeds of the random encoders' initialisation")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for decoding")
    parser.add_argument("--modalities", nargs="+", choices=("image", "video"), default=["image", "video"])
    args = parser.parse_args(argv)
    results = compare(args.checkpoint, args.data_root, args.random_seeds, args.workers, tuple(args.modalities))
    print_report(results, args.checkpoint)


if __name__ == "__main__":
    main()

"""Random draws in workers derive from (seed, epoch, index), so a run and its resumption draw the same samples."""

from __future__ import annotations

import hashlib

import torch


def sample_generator(seed: int, epoch: int, index: int, *stream: int | str) -> torch.Generator:
    """A generator for one sample's draws; ``stream`` separates independent draws (window, replica crop, mask)."""
    key = ":".join(str(p) for p in (seed, epoch, index, *stream)).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1))
    return g


def loader_generator(seed: int, *stream: int | str) -> torch.Generator:
    """A DataLoader's own generator. Without one, every new loader iterator takes its worker base seed from
    torch's global generator, so how often validation runs would shift the drop path and Mixup draws of training."""
    return sample_generator(seed, 0, 0, "loader", *stream)


def split_key(key: int | tuple[int, int], default_epoch: int) -> tuple[int, int]:
    """Dataset keys are ``index`` or ``(index, epoch)``; the interleaver passes the epoch with every index
    so that persistent workers never depend on an attribute set in the main process."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), default_epoch

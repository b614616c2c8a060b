"""A benchmark run small enough for a 2-core CPU: tiny model, 32 px, 4 frames, one step of each kind."""

from __future__ import annotations

import pytest

TINY = ["--size", "tiny", "--model-overrides", "embed_dim=64,depth=2,num_heads=4,decoder_embed_dim=32,decoder_depth=1,"
        "decoder_num_heads=4", "--img-size", "32", "--num-frames", "4", "--steps", "1", "--warmup", "1",
        "--batch-size", "2", "--device", "cpu"]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)

"""configs/trainer/fsdp.yaml (FSDP1, for stacks without FSDP2): FSDP refuses the CPU, so here the config is
parsed the way the CLI parses it, its wrap and checkpoint policies are checked against the model's blocks, and
gradient clipping by norm goes to FSDP's own clip_grad_norm_. The prepared GPU check runs it for real."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import yaml
from cli_helpers import REPO
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from timm.models.vision_transformer import Block

from omnimae_pl.strategies import MixedPrecisionFSDPStrategy
from omnimae_pl.tasks.pretrain import OmniMAEPretrain

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 2,
        "decoder_num_heads": 2}


def _shipped_strategy() -> MixedPrecisionFSDPStrategy:
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    trainer = yaml.safe_load((REPO / "configs" / "trainer" / "fsdp.yaml").read_text())["trainer"]
    cfg = parser.parse_object({"strategy": trainer["strategy"]})
    return parser.instantiate_classes(cfg).strategy


def test_the_shipped_fsdp1_config_wraps_and_checkpoints_every_transformer_block():
    strategy = _shipped_strategy()
    assert isinstance(strategy, MixedPrecisionFSDPStrategy)
    precision = strategy.mixed_precision
    assert (precision.param_dtype, precision.reduce_dtype, precision.buffer_dtype) == (
        torch.bfloat16, torch.float32, torch.bfloat16)
    model = OmniMAEPretrain(size="tiny", model_overrides=TINY, img_size=32, num_frames=4).model
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == TINY["depth"] + TINY["decoder_depth"]
    # one FSDP unit and one activation-checkpoint region per transformer block, of the encoder and the decoder
    for policy in (strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]):
        assert [m for m in model.modules() if isinstance(m, tuple(policy._module_classes))] == blocks
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"


def test_gradient_clipping_by_norm_under_fsdp1_uses_fsdps_own_norm():
    task = OmniMAEPretrain(size="tiny", model_overrides=TINY, img_size=32, num_frames=4)
    clipped = []
    strategy = MixedPrecisionFSDPStrategy()
    strategy.model = SimpleNamespace(clip_grad_norm_=clipped.append)  # the FSDP root module
    task._trainer = SimpleNamespace(strategy=strategy)
    task.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert clipped == [0.5]

"""Distributed settings that YAML cannot spell directly."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision


class MixedPrecisionFSDPStrategy(FSDPStrategy):
    """FSDP1 with its parameter, gradient-reduction and buffer dtypes named in YAML.

    The defaults keep bf16 parameters and buffers and reduce gradients in fp32; Lightning's ``bf16-mixed``
    alone keeps fp32 parameters and reduces in bf16. Other arguments go to ``FSDPStrategy``.
    """

    def __init__(
        self,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        buffer_dtype: str = "bfloat16",
        **kwargs: Any,
    ) -> None:
        dtypes = [getattr(torch, name, None) for name in (param_dtype, reduce_dtype, buffer_dtype)]
        if not all(isinstance(d, torch.dtype) for d in dtypes):
            raise ValueError(f"unknown torch dtype among {param_dtype!r}, {reduce_dtype!r}, {buffer_dtype!r}")
        super().__init__(mixed_precision=MixedPrecision(*dtypes), **kwargs)

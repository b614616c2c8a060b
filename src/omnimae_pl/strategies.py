"""Distributed settings that YAML cannot spell directly."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
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
        # LayerNorms stay fp32 (FSDP wraps them apart): autocast runs layer_norm in fp32 and would otherwise
        # meet bf16 weights.
        precision = MixedPrecision(*dtypes, _module_classes_to_ignore=(torch.nn.LayerNorm,))
        super().__init__(mixed_precision=precision, **kwargs)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over every process: ModelParallelStrategy with a data-parallel mesh as wide as
    the world and no tensor parallelism ("auto" would make data parallelism span nodes only). The
    LightningModule's ``configure_model`` does the sharding.

    Checkpoints are one file holding the full state (gathered on rank 0), which resumes on any number of processes
    and loads where no FSDP runs (``init_from``, ``export``, ``reconstruct``); ``save_distributed_checkpoint:
    true`` writes each rank's shard into a folder instead (faster for the largest models, but it resumes only
    under FSDP2)."""

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

"""Join the process group a launcher (torchrun, deepspeed) describes in the environment.

Training gets its process group from the transformers Trainer; commands without a Trainer
(evaluation, mining) run inside `launched_job()` so their ranks can split the encoding.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def launched_job() -> Iterator[str | None]:
    """Under a launcher (WORLD_SIZE > 1, no group yet): init nccl on cuda:LOCAL_RANK, or gloo
    on CPU, yield this rank's device and destroy the group on exit. Otherwise yield None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield None
        return
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()

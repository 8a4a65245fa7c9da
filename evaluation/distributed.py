"""Sharded evaluation: the same ``edit.py`` command under ``torchrun`` splits the cases.

    torchrun --nproc_per_node 2 edit.py --editor rome --limit 200

Every process loads the model, edits and scores its share of the cases (every ``world``-th editor
call, starting at its ``rank``) and writes them to its own file; at the end the shares are merged
into ``cases.jsonl`` in the order of the data, and the summary metrics are reduced across
processes by torchmetrics' synchronisation, so the run reports what one process would have.
Only ``single`` and ``batch`` modes shard: in ``sequential`` mode every edit depends on all the
earlier ones.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current_shard() -> Shard:
    """This process's place in an initialised process group (one process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def init_from_environment(device: str = "auto") -> tuple[Shard, str]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) and pick this process's
    device (``cuda:<LOCAL_RANK>`` on GPUs). Returns the shard and the device to load the model on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return current_shard(), device
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if cuda and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    shard = current_shard()
    logger.info("process %d of %d, device %s", shard.rank, shard.world, device)
    return shard, device

"""Where a rank of a multi-process file job stands: its rank from torchrun or Slurm, its device, the share of units
of each DataLoader worker (`lvm.tokenize` and `lvm.annotate`; ranks never talk to each other)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import get_worker_info

from common.errors import UserError


def worker_share(count: int) -> range:
    """The indices of `count` units this DataLoader worker reads: w, w + W, ... (all of them outside a worker).

    Whole units per worker, so each unit's output is written by one process.
    """
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return range(worker, count, workers)


def ranks_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM; (0, 1, 0) alone.

    Checked: a rank at or past the world size would do nothing and exit 0, leaving its share undone unnoticed."""
    env = os.environ
    for names in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        rank_name, world_name, local_name = names
        if rank_name in env and world_name in env:
            try:
                rank, world, local = int(env[rank_name]), int(env[world_name]), int(env.get(local_name, 0))
            except ValueError:
                raise UserError(f"{rank_name}={env[rank_name]!r}, {world_name}={env[world_name]!r}, "
                                f"{local_name}={env.get(local_name, '0')!r}: not whole numbers") from None
            if not 0 <= rank < world:
                raise UserError(f"{rank_name}={rank}, {world_name}={world}: need 0 <= {rank_name} < {world_name}")
            if local < 0:
                raise UserError(f"{local_name}={local}: need 0 or more")
            return rank, world, local
    return 0, 1, 0


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """The requested device, or cuda:LOCAL_RANK when CUDA is available, else the CPU. A GPU becomes the current one
    too: work that names no device (events, streams, allocations) then lands on it, not on cuda:0."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device

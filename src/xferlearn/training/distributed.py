"""Several processes, GPUs or machines: Lightning starts them, torch.distributed joins them.

`launch` runs the whole of `train()` once per process. Lightning's Fabric starts the
processes (`ddp`: it re-runs the command once per extra local process, as Lightning's
Trainer does; `ddp_spawn`: it spawns a function) or, under torchrun or SLURM, finds them
from the environment, and opens the process group. Every later `L.Trainer` (the head, each
fine-tune stage) then runs DDP in those same processes (LOCAL_RANK is set, so Lightning
launches nothing more and reuses the group). Between the fits, the stages that are not
Lightning loops (feature extraction, calibration) split their images by rank and meet
through torch.distributed (`barrier`, `gather_rows`).

Batch sizes stay global: each of W processes takes 1/W of every batch, so a run computes
the same steps at any scale. Only rank 0 writes run files.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import XferlearnError


def world_size(config: TrainConfig) -> int:
    return config.devices * config.num_nodes


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items, by_rank: int | None = None, of: int | None = None):
    """This process's share of `items`: every W-th from its rank (the layout `gather_rows` undoes)."""
    r, w = (rank(), size()) if by_rank is None else (by_rank, of)
    return items[r::w]


def gather_rows(local: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    """Every process's `shard` of n rows, reassembled in the original order on every process."""
    if not is_distributed():
        return local
    parts: list = [None] * size()
    dist.all_gather_object(parts, local)
    shape = list(local.shape)
    shape[axis] = n
    whole = np.empty(shape, dtype=local.dtype)
    for r, part in enumerate(parts):
        index = [slice(None)] * len(shape)
        index[axis] = slice(r, n, len(parts))
        whole[tuple(index)] = part
    return whole


def unpad_gathered(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """Lightning's all_gather of what DistributedSampler(shuffle=False) gave each rank, (W, m, ...),
    back to the n samples in order: rank r held padded positions r, r+W, ..., and the padding
    (the first samples again, to make the ranks even) is cut, so no image counts twice."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:n]


def per_process_batch(batch_size: int) -> int:
    """A global batch size split across the processes."""
    return max(1, math.ceil(batch_size / size()))


def loader_workers(config: TrainConfig) -> int | None:
    """DataLoader workers per process: --workers, or a share of this machine's cores (None, one
    process: image_loader's own choice)."""
    from ..models.features import default_workers

    if config.workers is not None or config.devices == 1:
        return config.workers
    return default_workers(config.devices)


def device(config: TrainConfig) -> torch.device:
    """This process's device: its own GPU by local rank, or the CPU."""
    if config.accelerator == "gpu" and not torch.cuda.is_available():
        raise XferlearnError("--accelerator gpu needs a CUDA GPU and this machine shows none; "
                             "use --accelerator cpu (or auto).")
    if config.accelerator == "gpu" or (config.accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def trainer_options(config: TrainConfig, single_process_accelerator: str | None = None) -> dict:
    """Trainer arguments for a fit inside the launched processes. A single process may run a
    fit where it is cheapest (the head on cached features: the CPU); several train where the
    process group lives, with DDP over the processes `launch` started."""
    if world_size(config) == 1:
        return {"accelerator": single_process_accelerator or device(config).type, "devices": 1}
    return {"accelerator": device(config).type, "devices": config.devices, "num_nodes": config.num_nodes,
            "strategy": "ddp"}


def _fabric(config: TrainConfig):
    from lightning.fabric import Fabric

    strategy = "ddp" if config.strategy == "auto" else config.strategy
    return Fabric(accelerator="cuda" if device(config).type == "cuda" else "cpu", devices=config.devices,
                  num_nodes=config.num_nodes, strategy=strategy)


def _in_spawned_process(fabric, function, config: TrainConfig):
    # Spawned processes get no LOCAL_RANK; set the variables Lightning reads, so the fits'
    # Trainers see processes created for them and join the open group instead of spawning.
    os.environ.update(LOCAL_RANK=str(dist.get_rank() % config.devices), NODE_RANK=str(dist.get_rank() // config.devices),
                      WORLD_SIZE=str(dist.get_world_size()))
    return function(config)


def launch(function, config: TrainConfig):
    """`function(config)` in every process of the run; returns its result (rank 0's with ddp_spawn)."""
    if world_size(config) == 1:
        return function(config)
    fabric = _fabric(config)
    if config.strategy == "ddp_spawn":
        return fabric.launch(_in_spawned_process, function, config)
    fabric.launch()
    result = function(config)
    barrier()  # no process leaves (and tears the group down) while another still works
    return result

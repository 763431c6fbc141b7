"""torchrun / DDP helpers: process group from the environment, samplers, loaders, model wrapping.

Launch with ``torchrun --nproc_per_node=N ...``; :func:`init_distributed` reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and picks NCCL on CUDA, gloo on the CPU. Without those variables everything runs as a single
process (rank 0 of 1) and the helpers are no-ops.

Why a wrapper module: DDP synchronises gradients only for computations that go through ``DDP.forward``, but the
models train through ``model.loss(batch)``. :class:`LossForward` is a thin module whose ``forward(batch)`` calls
``model.loss(batch)``; the trainer wraps *that* in DDP, so the loss runs inside DDP's forward and backward
all-reduces the gradients. Checkpoints always hold the plain model (:func:`unwrap_model`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 when torch.distributed is not initialised)."""
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``; select this rank's CUDA device.

    ``backend=None`` picks ``"nccl"`` when CUDA is available, else ``"gloo"``. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_initialized():
        for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), init_method="env://")
    return dist_info()


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def default_device() -> torch.device:
    """This rank's CUDA device when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info().local_rank)
    return torch.device("cpu")


class LossForward(nn.Module):
    """``forward(batch) = model.loss(batch)``: routes the training loss through ``forward`` so that DDP sees it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "loss", None)):
            raise TypeError(f"{type(model).__name__} has no loss(batch) method: it cannot be trained")
        self.model = model

    def forward(self, batch: dict):
        return self.model.loss(batch)


def wrap_for_training(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """``LossForward(model)``, inside ``DistributedDataParallel`` when the world has more than one rank."""
    runner = LossForward(model)
    if dist_info().world_size == 1:
        return runner
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(runner, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / :class:`LossForward` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, LossForward):
            model = model.model
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. seed, epoch, rank), independent streams for distinct keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    info = dist_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


class TrainSampler(Sampler[int]):
    """Shuffled, rank-sharded and resumable training sampler.

    Epoch ``e``'s order is a pure function of ``(seed, e)``: a permutation of the dataset, padded by wrapping
    around to a multiple of ``world_size`` (as ``DistributedSampler``), of which rank ``r`` takes every
    ``world_size``-th index from ``r``. ``set_epoch(e, skip)`` selects the epoch and drops its first ``skip``
    indices of this rank, which is how a resumed run continues mid-epoch with the same remaining samples in
    the same order. ``len()`` is the number of indices still to come in the epoch.
    """

    def __init__(self, dataset: Dataset | int, *, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        self.size = dataset if isinstance(dataset, int) else len(dataset)
        if self.size < 1:
            raise ValueError("TrainSampler: the dataset is empty")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank, self.world_size = _world(rank, world_size)
        self.per_rank = math.ceil(self.size / self.world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"TrainSampler: skip={skip} is not in [0, {self.per_rank}]")
        self.epoch, self.skip = int(epoch), int(skip)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        total = self.per_rank * self.world_size
        if total > self.size:
            order = torch.cat([order, order.repeat(math.ceil(total / self.size))[: total - self.size]])
        return iter(order[self.rank:total:self.world_size][self.skip:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip


class EvalSampler(Sampler[int]):
    """Contiguous shard ``[r*n/W, (r+1)*n/W)`` of the dataset per rank: every sample exactly once, no padding."""

    def __init__(self, dataset: Dataset | int, *, rank: int | None = None, world_size: int | None = None):
        self.size = dataset if isinstance(dataset, int) else len(dataset)
        self.rank, self.world_size = _world(rank, world_size)
        self.start = self.rank * self.size // self.world_size
        self.stop = (self.rank + 1) * self.size // self.world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def build_train_loader(dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                       drop_last: bool = True, num_workers: int = 0, collate_fn=None, pin_memory: bool = False,
                       persistent_workers: bool = False, rank: int | None = None,
                       world_size: int | None = None) -> DataLoader:
    """A training ``DataLoader`` that the trainer can resume exactly: a :class:`TrainSampler` (sharded over
    ranks) and a ``torch.Generator`` that the trainer re-seeds per epoch, which fixes the seeds of the workers
    (torch seeds ``random``, ``numpy`` and ``torch`` in each worker from it). ``batch_size`` is per rank."""
    sampler = TrainSampler(dataset, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory, generator=torch.Generator(),
                      persistent_workers=persistent_workers and num_workers > 0)


def build_eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0, collate_fn=None,
                      pin_memory: bool = False, rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """A test ``DataLoader`` whose ranks together see every sample exactly once (:class:`EvalSampler`)."""
    sampler = EvalSampler(dataset, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory)

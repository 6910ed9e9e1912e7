"""Data-parallel training across processes started by torchrun, and the training device.

    torchrun --nproc_per_node=N -m training fit --config configs/NAME.yaml

Every process (rank) builds the same model from the same seed, walks the same shuffled order of
training windows and, at each optimizer step, takes its share of the same global batch
(``train.batch_size`` windows: rank r the r-th, r + N-th, ... of them). DistributedDataParallel
averages the gradients, and each rank's loss is its points' pinball sum over the *global* count of
points times N, so the averaged gradient is exactly the one-process gradient of the whole batch:
N processes train the model one process would, up to the order of float sums. Validation is
sharded and summed the same way, and every decision (early stopping, the time budget) is taken
on numbers all ranks share, so no rank stops alone. Rank 0 alone logs, exports and registers.

Backend: gloo on CPU, NCCL on CUDA. ``train.device``: ``auto`` (CUDA when torch sees a GPU),
``cpu`` or ``cuda`` (an error where there is none); under torchrun each rank takes the GPU of its
LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Workers:
    """Where this process trains and which share of each batch is its own."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, rows):
        """This rank's part of a global batch of rows (every world-th, from its rank)."""
        return rows[self.rank :: self.world]

    def total(self, value: float | torch.Tensor) -> float:
        """The sum over ranks (the value itself when alone)."""
        if not self.distributed:
            return float(value)
        t = torch.as_tensor(value, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def largest(self, value: float) -> float:
        """The maximum over ranks: for decisions every rank must take alike (e.g. epoch times)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor(value, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def from_main(self, value: float) -> float:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return float(value)
        t = torch.tensor(value, dtype=torch.float64, device=self._collective_device)
        dist.broadcast(t, src=0)
        return float(t)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def training_device(choice: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``train.device`` (auto | cpu | cuda)."""
    if choice not in DEVICES:
        raise ValueError(f"train.device must be one of {DEVICES}, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda, but torch sees no CUDA device here; use auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def workers_from_env(device: str = "auto") -> Workers:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), joined once; a single Workers() when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    place = training_device(device, local_rank)
    if world <= 1:
        return Workers(device=place)
    if not dist.is_initialized():
        backend = "nccl" if place.type == "cuda" else "gloo"
        if place.type == "cuda":
            torch.cuda.set_device(place)
        dist.init_process_group(backend=backend)
    return Workers(rank=dist.get_rank(), world=dist.get_world_size(), device=place)


def finish(workers: Workers) -> None:
    """Leave the process group after the last collective (training's end): no barrier, since rank 0
    goes on to backtest, export and register while the others are done."""
    if workers.distributed and dist.is_initialized():
        dist.destroy_process_group()

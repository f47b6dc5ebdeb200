"""Several processes under ``torchrun``: layers split by index, results shared, rank 0 writes.

    torchrun --nproc-per-node 2 --no-python lora-compress compress MODEL --out OUT --ratio 0.5

Process p factors targets p, p+K, p+2K, … (K processes); after each round of K layers every
process receives every result (``all_gather_object``), so an error on one process is raised on
all of them. Layers are factored independently with the same seed, so the output is the same
as a single process's: bit for bit when both use the same number of BLAS threads (torchrun
sets OMP_NUM_THREADS=1), else equal up to float rounding (~1e-7 relative; LAPACK's blocking
depends on the thread count). Backend: gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import LoraCompressError


@dataclass(frozen=True)
class Group:
    """This process's place among the ``world`` processes of a run (world 1: no torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def share(self, item) -> list:
        """Every process's ``item``, in rank order (the item itself when alone)."""
        if self.world == 1:
            return [item]
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, item)
        return gathered


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str = "cpu") -> Group:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); a lone group without torchrun."""
    if not launched():
        return Group()
    if not torch.distributed.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Group(torch.distributed.get_rank(), torch.distributed.get_world_size())


def leave(group: Group, finished: bool = True) -> None:
    """Leave the process group joined by :func:`join`.

    A process that ``finished`` first waits for the others: rank 0 is still writing when the rest
    are done, and gloo could abort a process that tore the group down alone ("terminate called
    without an active exception", 1 run in 12 on 2 CPU processes). One that failed leaves at once,
    and torchrun then stops the others.
    """
    if group.world > 1 and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def check_split(group: Group, layers: int) -> None:
    """Refuse more processes than layers to factor (some would have nothing to do)."""
    if group.world > layers:
        raise LoraCompressError(f"{group.world} processes but only {layers} layers to factor; "
                                f"run torchrun with --nproc-per-node {layers} or fewer")


def is_main_process() -> bool:
    """True unless torchrun started this process with a rank other than 0 (only rank 0 prints)."""
    return int(os.environ.get("RANK", "0")) == 0

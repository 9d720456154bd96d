"""Device placement, mixed precision and data parallelism (HF Accelerate when available).

Single-process CPU runs work plainly; ``accelerate launch -m trainer …`` runs one process per
GPU, each computing on its own samples: statistics are summed across processes, gradients and
losses averaged. ``torchrun --nproc_per_node N -m trainer …`` with ``--device cpu`` runs N CPU
processes over gloo (a test of the data-parallel path without GPUs; ``accelerate launch --cpu``
always starts one process).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import TrainerError, UsageError


def launched_processes() -> tuple[int, int]:
    """``(rank, world size)`` that a launcher (``torchrun``, ``accelerate launch``) gave this process
    through ``RANK``/``WORLD_SIZE``; ``(0, 1)`` for a plain process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where and how to compute; ``process_index``/``num_processes`` describe data parallelism."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    mixed_precision: str = "no"
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for model calls (a no-op for ``mixed_precision = "no"``)."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        if self.accelerator is not None:
            return self.accelerator.autocast()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def all_reduce_(self, tensors: list[torch.Tensor], op: str = "mean") -> None:
        """Sum or average tensors across processes, in place (no-op for one process)."""
        if self.num_processes == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "mean":
                t.div_(self.num_processes)

    def gather_rows(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``t`` (same trailing shape and dtype, any number of rows), in process order,
        as CPU tensors on every process. Plain tensors only (no pickling)."""
        if self.num_processes == 1:
            return [t.cpu()]
        import torch.distributed as dist

        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
        counts = [torch.zeros_like(n) for _ in range(self.num_processes)]
        dist.all_gather(counts, n)
        rows = max(int(c) for c in counts)
        padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=dev)
        padded[: t.shape[0]] = t.to(dev)
        out = [torch.empty_like(padded) for _ in range(self.num_processes)]
        dist.all_gather(out, padded)
        return [o[: int(c)].cpu() for o, c in zip(out, counts)]

    def barrier(self) -> None:
        if self.num_processes > 1 and self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on the main process first (e.g. writing a cache), then on the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def make_runtime(device: str, mixed_precision: str) -> Runtime:
    """``device`` is auto | cpu | cuda | cuda:N | mps. Accelerate handles auto/cpu/cuda.

    Under a launcher with several processes ``cuda:N`` is refused (every process would take the
    same GPU and act as the main one); each process gets its own GPU from ``LOCAL_RANK`` instead.
    """
    _, world = launched_processes()
    if device.startswith("cuda:") and world > 1:
        raise UsageError(f"--device {device} names one GPU, but this is one of {world} launched processes; "
                         "use --device auto or cuda (each process takes the GPU of its LOCAL_RANK)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available")
    if device.startswith("cuda:"):
        dev = torch.device(device)
        return Runtime(dev, mixed_precision=mixed_precision)
    try:
        from accelerate import Accelerator
    except ImportError:
        if world > 1:
            raise UsageError(f"{world} launched processes need `accelerate` (pip install accelerate)") from None
        dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else
                           ("mps" if device == "mps" else "cpu"))
        return Runtime(dev, mixed_precision=mixed_precision)
    try:
        acc = Accelerator(mixed_precision=mixed_precision, cpu=(device == "cpu"))
    except ValueError:
        # A single process that already ran a command with other settings (e.g. tests, notebooks):
        # Accelerate keeps one global state; start it afresh.
        from accelerate.state import AcceleratorState

        if AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(mixed_precision=mixed_precision, cpu=(device == "cpu"))
    if world > 1 and acc.num_processes != world:
        raise TrainerError(f"the launcher started {world} processes but Accelerate joined {acc.num_processes}")
    return Runtime(acc.device, acc.process_index, acc.num_processes, mixed_precision, acc)

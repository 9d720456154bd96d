"""Device placement, mixed precision and data parallelism (HF Accelerate when available).

Single-process CPU runs work plainly; ``accelerate launch -m trainer …`` runs one process per
GPU, each computing on its own samples, with gradients and statistics summed across processes.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import UsageError

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
    """``device`` is auto | cpu | cuda | cuda:N | mps. Accelerate handles auto/cpu/cuda."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available")
    if device.startswith("cuda:"):
        dev = torch.device(device)
        return Runtime(dev, mixed_precision=mixed_precision)
    try:
        from accelerate import Accelerator
    except ImportError:
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
    return Runtime(acc.device, acc.process_index, acc.num_processes, mixed_precision, acc)

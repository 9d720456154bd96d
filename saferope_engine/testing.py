"""Random, valid adapters for tests and benchmarks (seeded; no model needed)."""

from __future__ import annotations

from typing import Iterable

import torch

from .adapter import AdapterMeta, BlockAdapter, SafeRoPEAdapter

__all__ = ["random_orthonormal", "random_skew", "random_adapter"]


def random_orthonormal(n: int, D: int, r: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, D, r)`` float32 with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, D, r, generator=generator, dtype=torch.float64))
    return q.to(torch.float32)


def random_skew(n: int, r: int, *, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, r, r)`` float32 skew-symmetric, entries of size ~``scale``."""
    w = torch.randn(n, r, r, generator=generator, dtype=torch.float64) * scale
    return (w - w.transpose(-1, -2)).to(torch.float32)


def random_adapter(*, num_heads: int, head_dim: int, num_double_blocks: int, num_single_blocks: int,
                   rank: int = 2, blocks: Iterable[tuple[str, int]] | None = None,
                   heads: Iterable[int] | None = None, segments: Iterable[str] = ("txt", "img"),
                   threshold: float = 0.5, scale: float = 1.0, seed: int = 0,
                   concepts: tuple[str, ...] = ("test",)) -> SafeRoPEAdapter:
    """A valid adapter with random bases and generators.

    ``blocks`` defaults to every block; ``heads`` to all heads; ``segments`` says which
    generators each block gets.
    """
    g = torch.Generator().manual_seed(seed)
    if blocks is None:
        blocks = [("double", i) for i in range(num_double_blocks)] + [("single", i) for i in range(num_single_blocks)]
    head_list = list(range(num_heads)) if heads is None else sorted(heads)
    segments = tuple(segments)
    n = len(head_list)
    out = []
    for kind, idx in blocks:
        out.append(BlockAdapter(
            kind, idx, torch.tensor(head_list, dtype=torch.int64),
            random_orthonormal(n, head_dim, rank, generator=g), random_orthonormal(n, head_dim, rank, generator=g),
            random_skew(n, rank, scale=scale, generator=g) if "txt" in segments else None,
            random_skew(n, rank, scale=scale, generator=g) if "img" in segments else None))
    meta = AdapterMeta(num_heads=num_heads, head_dim=head_dim, num_double_blocks=num_double_blocks,
                       num_single_blocks=num_single_blocks, rank=rank, threshold=threshold,
                       concepts=concepts, base_model="random")
    return SafeRoPEAdapter(meta, out)

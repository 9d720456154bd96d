"""Random, valid adapters for tests and benchmarks (seeded; no model needed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from . import arch as archs
from .adapter import AdapterMeta, BlockAdapter, SafeRoPEAdapter, key_heads

__all__ = ["random_orthonormal", "random_skew", "random_adapter"]


def random_orthonormal(n: int, D: int, r: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, D, r)`` float32 with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, D, r, generator=generator, dtype=torch.float64))
    return q.to(torch.float32)


def random_skew(n: int, r: int, *, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, r, r)`` float32 skew-symmetric, entries of size ~``scale``."""
    w = torch.randn(n, r, r, generator=generator, dtype=torch.float64) * scale
    return (w - w.transpose(-1, -2)).to(torch.float32)


def random_adapter(*, num_heads: int, head_dim: int, model_blocks: Mapping[str, int], arch: str = "flux1",
                   num_kv_heads: int | None = None, rank: int = 2, blocks: Iterable[tuple[str, int]] | None = None,
                   heads: Iterable[int] | None = None, segments: Iterable[str] = ("txt", "img"),
                   threshold: float = 0.5, scale: float = 1.0, seed: int = 0,
                   concepts: tuple[str, ...] = ("test",)) -> SafeRoPEAdapter:
    """A valid adapter of family ``arch`` with random bases and generators.

    ``model_blocks``: block kind → count of the target model. ``blocks`` defaults to every block;
    ``heads`` to all heads; ``segments`` says which generators each block gets (segments a kind
    does not carry are left out).
    """
    g = torch.Generator().manual_seed(seed)
    family = archs.get(arch)
    if blocks is None:
        blocks = [(kind, i) for kind in family.kind_names for i in range(model_blocks.get(kind, 0))]
    head_list = list(range(num_heads)) if heads is None else sorted(heads)
    group = 1 if num_kv_heads is None else num_heads // num_kv_heads
    h = torch.tensor(head_list, dtype=torch.int64)
    n, n_k = len(head_list), key_heads(h, group).numel()
    out = []
    for kind, idx in blocks:
        segs = [s for s in segments if s in family.kind(kind).segments]
        out.append(BlockAdapter(
            kind, idx, h.clone(),
            random_orthonormal(n, head_dim, rank, generator=g), random_orthonormal(n_k, head_dim, rank, generator=g),
            random_skew(n, rank, scale=scale, generator=g) if "txt" in segs else None,
            random_skew(n, rank, scale=scale, generator=g) if "img" in segs else None))
    meta = AdapterMeta(num_heads=num_heads, head_dim=head_dim, rank=rank, blocks=dict(model_blocks), arch=arch,
                       num_kv_heads=num_kv_heads, threshold=threshold, concepts=concepts, base_model="random")
    return SafeRoPEAdapter(meta, out)

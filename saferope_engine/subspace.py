"""Unsafe subspaces and safety-critical heads from streamed query/key statistics (design §3).

1. :class:`GramAccumulator` streams ``G = Σ x xᵀ`` per (block kind, block, q|k, segment) and
   head, with token counts and padding excluded — memory is independent of the prompt count.
2. :func:`top_basis` takes the top-``r`` eigenvectors of a Gram (uncentred, like the authors), or
   of the contrast ``G_u/n_u − G_s/n_s`` (:func:`basis_for` with ``basis="contrast"``).
3. :func:`discrimination_scores` rates each head by ``d = E_unsafe − E_safe`` with
   ``E(G) = tr(UᵀGU) / tr(G)``; :func:`select_heads` keeps the best ones.
4. :func:`assemble_adapter` turns bases, the selection and generators into a
   :class:`~saferope_engine.adapter.SafeRoPEAdapter` (zero generators = identity at init).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .adapter import BLOCK_KINDS, SEGMENTS, AdapterMeta, BlockAdapter, SafeRoPEAdapter
from .errors import SafeRoPEError

logger = logging.getLogger(__name__)

__all__ = [
    "StatKey", "GramAccumulator", "top_basis", "contrast_gram", "basis_for", "BASES", "energy_share", "discrimination_scores", "HeadSelection",
    "select_heads", "assemble_adapter",
]

WHICH = ("q", "k")
StatKey = tuple[str, int, str, str]  # (kind, block index, "q"|"k", "txt"|"img")


class GramAccumulator:
    """Streaming per-head Gram matrices ``Σ x xᵀ`` and token counts.

    Keys are ``(kind, block, which, segment)``; each value is ``(H, D, D)`` in ``dtype``
    (float64 by default, on CPU by default: FLUX.1 needs ~3 MB per key and head set).
    """

    def __init__(self, num_heads: int, head_dim: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> None:
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.grams: dict[StatKey, Tensor] = {}
        self.counts: dict[StatKey, int] = {}

    def add(self, kind: str, index: int, which: str, x: Tensor, *, txt_len: int,
            txt_mask: Tensor | None = None, segments: Iterable[str] = SEGMENTS) -> None:
        """Accumulate ``(B, H, L, D)`` vectors of one block (text tokens first).

        Args:
            txt_len: number of leading text tokens.
            txt_mask: optional ``(B, txt_len)`` bool, true for real (non-padding) text tokens.
            segments: which segments to accumulate.
        """
        if kind not in BLOCK_KINDS or which not in WHICH:
            raise ValueError(f"bad key ({kind!r}, {which!r})")
        if x.ndim != 4 or x.shape[1] != self.num_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"expected (B, {self.num_heads}, L, {self.head_dim}), got {tuple(x.shape)}")
        B, H, L, D = x.shape
        if not 0 <= txt_len <= L:
            raise ValueError(f"txt_len {txt_len} outside [0, {L}]")
        with torch.no_grad():
            for seg in segments:
                a, b = (0, txt_len) if seg == "txt" else (txt_len, L)
                xs = x[:, :, a:b].to(self.device, self.dtype)  # (B,H,Ls,D)
                if seg == "txt" and txt_mask is not None:
                    if tuple(txt_mask.shape) != (B, txt_len):
                        raise ValueError(f"txt_mask must be ({B}, {txt_len}), got {tuple(txt_mask.shape)}")
                    m = txt_mask.to(self.device, self.dtype)[:, None, :, None]  # (B,1,Ls,1)
                    xs = xs * m  # padding rows contribute 0 to Σ x xᵀ
                    n = int(txt_mask.sum())
                else:
                    n = B * (b - a)
                if n == 0:
                    continue
                flat = xs.permute(1, 0, 2, 3).reshape(H, -1, D)  # (B,H,Ls,D) -> (H, B·Ls, D)
                g = flat.transpose(1, 2) @ flat  # (H, D, D)
                key = (kind, index, which, seg)
                if key in self.grams:
                    self.grams[key] += g
                    self.counts[key] += n
                else:
                    self.grams[key] = g
                    self.counts[key] = n

    def keys(self) -> list[StatKey]:
        return sorted(self.grams)

    def merge_(self, other: "GramAccumulator") -> "GramAccumulator":
        for key, g in other.grams.items():
            if key in self.grams:
                self.grams[key] += g.to(self.device, self.dtype)
                self.counts[key] += other.counts[key]
            else:
                self.grams[key] = g.to(self.device, self.dtype).clone()
                self.counts[key] = other.counts[key]
        return self

    # -- persistence (resumable collection) ------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for (kind, idx, which, seg), g in self.grams.items():
            name = f"{kind}.{idx}.{which}.{seg}"
            out[f"{name}.gram"] = g.detach().cpu().contiguous()
            out[f"{name}.count"] = torch.tensor([self.counts[(kind, idx, which, seg)]], dtype=torch.int64)
        return out

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write as safetensors, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"num_heads": str(self.num_heads), "head_dim": str(self.head_dim), **(metadata or {})}
        save_file(self.state_dict(), str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GramAccumulator":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                acc = cls(int(meta["num_heads"]), int(meta["head_dim"]))
                for name in f.keys():
                    if not name.endswith(".gram"):
                        continue
                    kind, idx, which, seg, _ = name.split(".")
                    key = (kind, int(idx), which, seg)
                    acc.grams[key] = f.get_tensor(name).to(acc.dtype)
                    acc.counts[key] = int(f.get_tensor(name[: -len("gram")] + "count")[0])
        except Exception as e:
            raise SafeRoPEError(f"{path}: not a readable statistics file ({type(e).__name__}: {e})") from None
        return acc

    @staticmethod
    def metadata_of(path: str | os.PathLike) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})


def top_basis(gram: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors of ``(..., D, D)`` Grams as ``(..., D, rank)`` float32.

    Columns are ordered by decreasing eigenvalue and signed so that each column's largest-magnitude
    entry is positive (deterministic output).
    """
    if not 1 <= rank <= gram.shape[-1]:
        raise ValueError(f"rank must be in [1, {gram.shape[-1]}], got {rank}")
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.transpose(-1, -2))
    _, vec = torch.linalg.eigh(g)  # ascending
    U = vec[..., -rank:].flip(-1)  # (..., D, rank), largest first
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, rank)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign[sign == 0] = 1.0
    return (U * sign).to(torch.float32)


BASES = ("unsafe", "contrast")


def contrast_gram(unsafe_gram: Tensor, unsafe_count: int, safe_gram: Tensor, safe_count: int,
                  weight: float = 1.0) -> Tensor:
    """``G_u/n_u − w·G_s/n_s`` (float64): at ``w = 1`` the directions in which unsafe tokens carry more
    energy than safe ones; ``w → 0`` approaches the plain unsafe Gram (the authors' basis)."""
    if unsafe_count <= 0 or safe_count <= 0:
        raise SafeRoPEError("contrast basis needs unsafe and safe statistics with at least one token each")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"contrast weight must be in [0, 1], got {weight}")
    return unsafe_gram.to(torch.float64) / unsafe_count - weight * safe_gram.to(torch.float64) / safe_count


def basis_for(unsafe: "GramAccumulator", safe: "GramAccumulator | None", key: StatKey, rank: int,
              basis: str = "unsafe", heads: Tensor | None = None, contrast_weight: float = 1.0) -> Tensor:
    """The ``(H|n, D, rank)`` unsafe basis of one statistics key.

    ``unsafe`` (the authors'): top eigenvectors of the uncentred unsafe Gram — it also captures
    directions every prompt shares (common words, the mean). ``contrast``: top eigenvectors of
    :func:`contrast_gram`, the directions where unsafe tokens carry *more* energy than safe ones,
    which keeps shared directions out of the subspace (and so out of the risk score);
    ``contrast_weight`` < 1 keeps part of them (see :func:`contrast_gram`).
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    G = unsafe.grams[key] if heads is None else unsafe.grams[key][heads]
    if basis == "contrast":
        if safe is None or key not in safe.grams:
            raise SafeRoPEError(f"contrast basis: no safe statistics for {key}")
        Gs = safe.grams[key] if heads is None else safe.grams[key][heads]
        G = contrast_gram(G, unsafe.counts[key], Gs, safe.counts[key], contrast_weight)
    return top_basis(G, rank)


def energy_share(gram: Tensor, U: Tensor) -> Tensor:
    """``tr(UᵀGU) / tr(G)`` per head: the share of the Gram's energy captured by ``span(U)``."""
    g = gram.to(torch.float64)
    U = U.to(torch.float64)
    num = torch.einsum("...dr,...de,...er->...", U, g, U)
    den = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)
    return (num / den.clamp_min(1e-30)).to(torch.float32)


def discrimination_scores(unsafe: GramAccumulator, safe: GramAccumulator, rank: int, *,
                          segment: str = "txt", which: Iterable[str] = WHICH,
                          num_blocks: Mapping[str, int] | None = None, basis: str = "unsafe",
                          contrast_weight: float = 1.0) -> dict[str, Tensor]:
    """``d = E_unsafe − E_safe`` per (kind, block, head), averaged over ``which`` (q and k).

    The subspace is :func:`basis_for` of the same key (``basis`` = ``unsafe`` or ``contrast``).

    Returns:
        ``{kind: (num_blocks, H) float32}``; blocks without statistics get ``-inf``.
    """
    which = tuple(which)
    found: dict[str, int] = {}
    for kind, idx, w, seg in unsafe.keys():
        if seg == segment and w in which:
            found[kind] = max(found.get(kind, 0), idx + 1)
    sizes = dict(num_blocks) if num_blocks is not None else found
    out: dict[str, Tensor] = {}
    for kind in BLOCK_KINDS:
        n = sizes.get(kind, 0)
        if n == 0:
            continue
        scores = torch.full((n, unsafe.num_heads), float("-inf"))
        for idx in range(n):
            parts = []
            for w in which:
                key = (kind, idx, w, segment)
                if key not in unsafe.grams or key not in safe.grams:
                    continue
                U = basis_for(unsafe, safe, key, rank, basis, contrast_weight=contrast_weight)  # (H, D, r)
                parts.append(energy_share(unsafe.grams[key], U) - energy_share(safe.grams[key], U))
            if parts:
                scores[idx] = torch.stack(parts).mean(0)
        out[kind] = scores
    return out


@dataclass(frozen=True)
class HeadSelection:
    """Heads chosen per block: ``{(kind, block): [head, …]}`` (sorted), plus the scores used."""

    heads: dict[tuple[str, int], list[int]]
    scores: dict[str, Tensor]

    def total(self) -> int:
        return sum(len(v) for v in self.heads.values())


def select_heads(scores: Mapping[str, Tensor], *, count: int | None = None, fraction: float | None = None,
                 margin: float | None = None, kinds: Iterable[str] = BLOCK_KINDS) -> HeadSelection:
    """Keep the best heads by discrimination score.

    ``count`` keeps the top-N over all blocks of ``kinds``; ``fraction`` the top share of all
    heads; ``margin`` only heads with ``d ≥ margin``. Combinations apply all of them (the
    intersection); at least one must be given. Ties break by (kind, block, head) order.
    """
    if count is None and fraction is None and margin is None:
        raise ValueError("give count, fraction and/or margin")
    if count is not None and count < 1:
        raise ValueError(f"count must be ≥ 1, got {count}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    cands: list[tuple[float, str, int, int]] = []
    for kind in kinds:
        s = scores.get(kind)
        if s is None:
            continue
        for b in range(s.shape[0]):
            for h in range(s.shape[1]):
                v = float(s[b, h])
                if math.isfinite(v):
                    cands.append((v, kind, b, h))
    total = len(cands)
    cands.sort(key=lambda t: (-t[0], BLOCK_KINDS.index(t[1]), t[2], t[3]))
    if margin is not None:
        cands = [c for c in cands if c[0] >= margin]
    limit = len(cands)
    if count is not None:
        limit = min(limit, count)
    if fraction is not None:
        limit = min(limit, max(1, round(fraction * total)))
    chosen: dict[tuple[str, int], list[int]] = {}
    for _, kind, b, h in cands[:limit]:
        chosen.setdefault((kind, b), []).append(h)
    return HeadSelection({k: sorted(v) for k, v in sorted(chosen.items(), key=lambda kv: (BLOCK_KINDS.index(kv[0][0]), kv[0][1]))},
                         dict(scores))


def assemble_adapter(unsafe: GramAccumulator, selection: HeadSelection | Mapping[tuple[str, int], list[int]],
                     *, rank: int, num_double_blocks: int, num_single_blocks: int,
                     segments: Mapping[str, Iterable[str]] | None = None,
                     generators: Mapping[str, Tensor] | None = None, threshold: float = 0.5,
                     concepts: Iterable[str] = (), base_model: str = "", config: Mapping | None = None,
                     basis_segment: str = "txt", basis: str = "unsafe",
                     safe: GramAccumulator | None = None, contrast_weight: float = 1.0) -> SafeRoPEAdapter:
    """Build an adapter from the unsafe statistics and a head selection.

    Args:
        unsafe: accumulated statistics of unsafe prompts; ``U_q``/``U_k`` are :func:`basis_for`
            their ``basis_segment`` statistics (``basis`` ``unsafe``, or ``contrast`` with ``safe``).
        selection: heads per ``(kind, block)``.
        segments: which generators each block kind gets, e.g. ``{"double": ["txt"], "single":
            ["txt", "img"]}`` (default: text only, the authors' double-block choice).
        generators: optional ``{"double.3.A_txt": (n, r, r)}`` tensors; missing ones are zero
            (identity at init).
    """
    heads_map = selection.heads if isinstance(selection, HeadSelection) else selection
    segments = {k: tuple(v) for k, v in (segments or {"double": ("txt",), "single": ("txt",)}).items()}
    generators = dict(generators or {})
    meta = AdapterMeta(num_heads=unsafe.num_heads, head_dim=unsafe.head_dim, num_double_blocks=num_double_blocks,
                       num_single_blocks=num_single_blocks, rank=rank, threshold=threshold,
                       concepts=tuple(concepts), base_model=base_model, config=config)
    blocks = []
    for (kind, idx), heads in heads_map.items():
        if not heads:
            continue
        h = torch.tensor(sorted(heads), dtype=torch.int64)
        bases = {}
        for w in WHICH:
            key = (kind, idx, w, basis_segment)
            if key not in unsafe.grams:
                raise SafeRoPEError(f"no {w} statistics for {kind} block {idx} ({basis_segment} segment)")
            bases[w] = basis_for(unsafe, safe, key, rank, basis, heads=h, contrast_weight=contrast_weight)  # (n, D, r)
        gens = {}
        for seg in segments.get(kind, ()):
            name = f"{kind}.{idx}.A_{seg}"
            g = generators.pop(name, None)
            gens[seg] = torch.zeros(len(h), rank, rank) if g is None else g.detach().to(torch.float32).clone()
        if not gens:
            continue
        blocks.append(BlockAdapter(kind, idx, h, bases["q"], bases["k"], gens.get("txt"), gens.get("img")))
    if generators:
        raise SafeRoPEError(f"generators given for blocks/segments not in the selection: {sorted(generators)}")
    return SafeRoPEAdapter(meta, blocks)

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import arch as archs
from .adapter import SEGMENTS, AdapterMeta, BlockAdapter, SafeRoPEAdapter, key_heads
from .core import segment_bounds
from .errors import SafeRoPEError

logger = logging.getLogger(__name__)

__all__ = [
    "StatKey", "GramAccumulator", "top_basis", "contrast_gram", "basis_for", "BASES", "energy_share",
    "discrimination_scores", "HeadSelection", "select_heads", "default_segments", "basis_segments", "assemble_adapter",
]

WHICH = ("q", "k")
StatKey = tuple[str, int, str, str]  # (kind, block index, "q"|"k", "txt"|"img")


class GramAccumulator:
    """Streaming per-head Gram matrices ``Σ x xᵀ`` and token counts.

    Keys are ``(kind, block, which, segment)``; each value is ``(H, D, D)`` in ``dtype``
    (float64 by default, on CPU by default: FLUX.1 needs ~3 MB per key and head set), with ``H``
    the key heads for ``which = "k"`` under grouped-query attention (``num_kv_heads``).
    """

    def __init__(self, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> None:
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = None if num_kv_heads in (None, num_heads) else num_kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.grams: dict[StatKey, Tensor] = {}
        self.counts: dict[StatKey, int] = {}

    def heads_of(self, which: str) -> int:
        return self.num_heads if which == "q" or self.num_kv_heads is None else self.num_kv_heads

    def add(self, kind: str, index: int, which: str, x: Tensor, *, txt_len: int, img_first: bool = False,
            txt_mask: Tensor | None = None, segments: Iterable[str] = SEGMENTS) -> None:
        """Accumulate ``(B, H, L, D)`` vectors of one block.

        Args:
            txt_len: number of text tokens (leading, or trailing with ``img_first``).
            txt_mask: optional ``(B, txt_len)`` bool, true for real (non-padding) text tokens.
            segments: which segments to accumulate.
        """
        if which not in WHICH or not (isinstance(kind, str) and kind):
            raise ValueError(f"bad key ({kind!r}, {which!r})")
        H = self.heads_of(which)
        if x.ndim != 4 or x.shape[1] != H or x.shape[3] != self.head_dim:
            raise ValueError(f"expected {which} of shape (B, {H}, L, {self.head_dim}), got {tuple(x.shape)}")
        B, _, L, D = x.shape
        if not 0 <= txt_len <= L:
            raise ValueError(f"txt_len {txt_len} outside [0, {L}]")
        bounds = segment_bounds(L, txt_len, img_first)
        with torch.no_grad():
            for seg in segments:
                a, b = bounds[seg]
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

    def merge_(self, other: GramAccumulator) -> GramAccumulator:
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
        if self.num_kv_heads is not None:
            meta["num_kv_heads"] = str(self.num_kv_heads)
        save_file(self.state_dict(), str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GramAccumulator:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                kv = int(meta["num_kv_heads"]) if "num_kv_heads" in meta else None
                acc = cls(int(meta["num_heads"]), int(meta["head_dim"]), num_kv_heads=kv)
                for name in f.keys():
                    if not name.endswith(".gram"):
                        continue
                    kind, idx, which, seg, _ = name.rsplit(".", 4)
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


def basis_for(unsafe: GramAccumulator, safe: GramAccumulator | None, key: StatKey, rank: int,
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
                          segment: str | Mapping[str, str] = "txt", which: Iterable[str] = WHICH,
                          num_blocks: Mapping[str, int] | None = None, basis: str = "unsafe",
                          contrast_weight: float = 1.0) -> dict[str, Tensor]:
    """``d = E_unsafe − E_safe`` per (kind, block, query head), averaged over ``which`` (q and k).

    The subspace is :func:`basis_for` of the same key (``basis`` = ``unsafe`` or ``contrast``).
    ``segment`` is the token segment scored, or a mapping kind → segment (kinds without text tokens
    are scored on their image tokens). Under grouped-query attention a query head takes the key
    score of its key head.

    Returns:
        ``{kind: (num_blocks, H) float32}`` in the order of ``num_blocks`` (or of the statistics);
        blocks without statistics get ``-inf``.
    """
    which = tuple(which)
    seg_of = (lambda kind: segment.get(kind, "txt")) if isinstance(segment, Mapping) else (lambda kind: segment)
    found: dict[str, int] = {}
    for kind, idx, w, seg in unsafe.keys():
        if seg == seg_of(kind) and w in which:
            found[kind] = max(found.get(kind, 0), idx + 1)
    sizes = dict(num_blocks) if num_blocks is not None else found
    group = 1 if unsafe.num_kv_heads is None else unsafe.num_heads // unsafe.num_kv_heads
    out: dict[str, Tensor] = {}
    for kind, n in sizes.items():
        if n == 0:
            continue
        scores = torch.full((n, unsafe.num_heads), float("-inf"))
        for idx in range(n):
            parts = []
            for w in which:
                key = (kind, idx, w, seg_of(kind))
                if key not in unsafe.grams or key not in safe.grams:
                    continue
                U = basis_for(unsafe, safe, key, rank, basis, contrast_weight=contrast_weight)  # (H_w, D, r)
                d = energy_share(unsafe.grams[key], U) - energy_share(safe.grams[key], U)  # (H_w,)
                parts.append(d.repeat_interleave(group) if w == "k" and group > 1 else d)  # key head -> its query heads
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
                 margin: float | None = None, kinds: Iterable[str] | None = None) -> HeadSelection:
    """Keep the best heads by discrimination score.

    ``count`` keeps the top-N over all blocks of ``kinds`` (default: every kind of ``scores``);
    ``fraction`` the top share of all heads; ``margin`` only heads with ``d ≥ margin``.
    Combinations apply all of them (the intersection); at least one must be given. Ties break by
    (kind order of ``scores``, block, head).
    """
    if count is None and fraction is None and margin is None:
        raise ValueError("give count, fraction and/or margin")
    if count is not None and count < 1:
        raise ValueError(f"count must be ≥ 1, got {count}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if margin is not None and not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin}")
    order = {k: i for i, k in enumerate(scores)}
    cands: list[tuple[float, str, int, int]] = []
    for kind in (list(scores) if kinds is None else kinds):
        s = scores.get(kind)
        if s is None:
            continue
        for b in range(s.shape[0]):
            for h in range(s.shape[1]):
                v = float(s[b, h])
                if math.isfinite(v):
                    cands.append((v, kind, b, h))
    total = len(cands)
    cands.sort(key=lambda t: (-t[0], order[t[1]], t[2], t[3]))
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
    return HeadSelection({k: sorted(v) for k, v in sorted(chosen.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))},
                         dict(scores))


def default_segments(family: archs.Arch) -> dict[str, tuple[str, ...]]:
    """Generators per kind when none are asked for: text tokens where a kind has them (the authors'
    choice for FLUX double blocks), else what the kind carries."""
    return {k.name: ("txt",) if "txt" in k.segments else k.segments for k in family.kinds}


def basis_segments(family: archs.Arch) -> dict[str, str]:
    """The segment whose statistics give each kind's bases and scores: text where a kind has text."""
    return {k.name: "txt" if "txt" in k.segments else k.segments[0] for k in family.kinds}


def assemble_adapter(unsafe: GramAccumulator, selection: HeadSelection | Mapping[tuple[str, int], list[int]],
                     *, rank: int, blocks: Mapping[str, int], arch: str = "flux1",
                     segments: Mapping[str, Iterable[str]] | None = None,
                     generators: Mapping[str, Tensor] | None = None, threshold: float = 0.5,
                     concepts: Iterable[str] = (), base_model: str = "", config: Mapping | None = None,
                     basis_segment: str | Mapping[str, str] | None = None, basis: str = "unsafe",
                     safe: GramAccumulator | None = None, contrast_weight: float = 1.0) -> SafeRoPEAdapter:
    """Build an adapter from the unsafe statistics and a head selection.

    Args:
        unsafe: accumulated statistics of unsafe prompts; ``U_q``/``U_k`` are :func:`basis_for`
            their ``basis_segment`` statistics (``basis`` ``unsafe``, or ``contrast`` with ``safe``;
            default per kind: :func:`basis_segments`).
        selection: query heads per ``(kind, block)``.
        blocks: block kind → count of the target model (every kind of ``arch``).
        segments: which generators each block kind gets, e.g. ``{"double": ["txt"], "single":
            ["txt", "img"]}`` (default :func:`default_segments`).
        generators: optional ``{"double.3.A_txt": (n, r, r)}`` tensors; missing ones are zero
            (identity at init — a file needs trained, non-zero ones).
    """
    family = archs.get(arch)
    heads_map = selection.heads if isinstance(selection, HeadSelection) else selection
    segments = {k: tuple(v) for k, v in (segments or default_segments(family)).items()}
    bseg = basis_segments(family)
    if isinstance(basis_segment, str):
        bseg = {k: basis_segment for k in bseg}
    elif basis_segment is not None:
        bseg.update(basis_segment)
    generators = dict(generators or {})
    meta = AdapterMeta(num_heads=unsafe.num_heads, head_dim=unsafe.head_dim, rank=rank, blocks=dict(blocks),
                       arch=family.id, num_kv_heads=unsafe.num_kv_heads, threshold=threshold,
                       concepts=tuple(concepts), base_model=base_model, config=config)
    out = []
    for (kind, idx), heads in heads_map.items():
        if not heads:
            continue
        h = torch.tensor(sorted(heads), dtype=torch.int64)
        bases = {}
        for w, hw in (("q", h), ("k", key_heads(h, meta.kv_group))):
            key = (kind, idx, w, bseg.get(kind, "txt"))
            if key not in unsafe.grams:
                raise SafeRoPEError(f"no {w} statistics for {kind} block {idx} ({key[3]} segment)")
            bases[w] = basis_for(unsafe, safe, key, rank, basis, heads=hw, contrast_weight=contrast_weight)  # (n_w, D, r)
        gens = {}
        for seg in segments.get(kind, ()):
            name = f"{kind}.{idx}.A_{seg}"
            g = generators.pop(name, None)
            gens[seg] = torch.zeros(len(h), rank, rank) if g is None else g.detach().to(torch.float32).clone()
        if not gens:
            continue
        out.append(BlockAdapter(kind, idx, h, bases["q"], bases["k"], gens.get("txt"), gens.get("img")))
    if generators:
        raise SafeRoPEError(f"generators given for blocks/segments not in the selection: {sorted(generators)}")
    return SafeRoPEAdapter(meta, out)

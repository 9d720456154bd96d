"""The SafeRoPE transform of one attention block (design §2).

For a token vector ``x ∈ R^D`` (a query or a key, after QK-norm, before RoPE) of a selected head:

    c  = Uᵀ x                                   coefficients in the unsafe subspace (R^r)
    ρ  = clamp(‖c‖² / max(‖x‖², 1e-12), 0, 1)   Latent Risk Score
    g  = ρ if ρ > τ else 0                      hard gate
    x' = x + U (exp(α·g·A) − I) c               rotate the in-subspace component only

Queries use ``U_q``, keys ``U_k``; both use the generator ``A`` of their head and segment (text
tokens ``A_txt``, image tokens ``A_img``). Each vector is transformed on its own (its own ρ), so
hosts that normalise q and k in separate modules call :func:`saferope_x` once per tensor, and
hosts that hand both over call :func:`saferope_qk`. Tokens with ``g = 0``, every token when
``α = 0``, unselected heads and segments without a generator come out bit-identical.

A sequence holds ``txt_len`` text tokens and then the image tokens, or — ``img_first`` — the
image tokens first (diffusers' HunyuanImage and Z-Image put them first).

Inference (no gradient into the generators) uses the closed form of :mod:`.rotation`, folded into
one operator set per block (:class:`DenseOperators`): queries and keys of a block are stacked
along a new leading dimension ``S`` (2; 1 for one tensor, or for grouped-query keys) and go
through one projection, one complex rotation and one back-projection, with one masked write
(:func:`fused_dense`). That function takes tensors only, never reads a value back to the host
(no synchronisation with a GPU) and compiles with ``torch.compile(fullgraph=True)``. On the
CPU, where reading the gate is free, the engine returns the inputs when no token is gated and
updates only the gated tokens when they are few (:data:`SPARSE_MAX_SHARE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .adapter import SEGMENTS, BlockAdapter
from .rotation import expm_apply_series, normal_form

__all__ = ["BlockRisk", "DenseOperators", "saferope_qk", "saferope_x", "latent_risk", "segment_bounds",
           "fused_dense", "dense_operators"]

_EPS = 1e-12
#: ``√_EPS``: ``max(‖x‖, 1e-6)² = max(‖x‖², 1e-12)``, so ρ may be computed from the norm.
_EPS_NORM = 1e-6
WHICH = ("q", "k")

#: On the CPU the engine reads the gate on the host (it is free there): no gated token -> the
#: inputs come back unchanged; few -> only those are updated. Elsewhere (CUDA, any device) it
#: never reads device values. ``False`` runs the device path on the CPU too (op-count benchmarks, tests).
HOST_SHORTCUTS = True

#: On the CPU the inference path updates only the gated tokens (gathered: usually a few prompt
#: tokens) when they are at most this share of the span; otherwise it stays dense. 0 disables
#: the gathered path.
SPARSE_MAX_SHARE = 0.25

#: Operator sets cached per block and device (one per strength × sequence layout seen); a full
#: cache is emptied and refilled, which only costs a few small tensor operations.
_MAX_CACHED_OPERATORS = 32
#: The projection's width ``K`` is padded with zero columns to a multiple of this: even, as the
#: complex view of the pair coordinates needs, and the width the CPU's GEMM runs fastest (14 -> 16
#: columns on the FLUX shape: benchmarks/gated_share.py, README Performance)
PROJ_COLUMNS = 16


@dataclass
class BlockRisk:
    """Per-token risk of one block, for the selected heads only.

    ``rho_*`` are ``(B, n, L)`` float32 Latent Risk Scores (``n_k`` key heads for ``rho_k`` under
    grouped-query attention); ``gated_*`` are bool of the same shape, true where ``ρ > τ`` in a
    segment that has a generator (the tokens the rotation acts on when ``strength > 0``).
    ``heads``/``heads_k`` index them; ``txt_len`` and ``img_first`` place the text tokens.
    """

    heads: Tensor
    txt_len: int
    rho_q: Tensor
    rho_k: Tensor
    gated_q: Tensor
    gated_k: Tensor
    heads_k: Tensor | None = None
    img_first: bool = False


def segment_bounds(L: int, txt_len: int, img_first: bool = False) -> dict[str, tuple[int, int]]:
    """``{"txt": (a, b), "img": (c, d)}`` token ranges of a length-``L`` sequence."""
    if img_first:
        return {"txt": (L - txt_len, L), "img": (0, L - txt_len)}
    return {"txt": (0, txt_len), "img": (txt_len, L)}


def latent_risk(x: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """LRS of ``(B, n, L, D)`` vectors against ``(n, D, r)`` bases. Returns ``(rho, c)``."""
    c = torch.matmul(x, U)  # (B,n,L,D) @ (n,D,r) -> (B,n,L,r)
    return _rho(c, x), c


def _rho(c: Tensor, x: Tensor) -> Tensor:
    """``clamp(‖c‖² / ‖x‖², 0, 1)``: ``c`` ``(…, r)`` coefficients of ``x`` ``(…, D)`` -> ``(…)``."""
    energy = torch.linalg.vector_norm(x, dim=-1).square()  # one pass over x
    return (c.square().sum(-1) / energy.clamp_min(_EPS)).clamp(0.0, 1.0)


# -- precomputed operators -------------------------------------------------------------------------

class DenseOperators(NamedTuple):
    """Everything :func:`fused_dense` needs for one block, side set, strength and sequence layout.

    ``S`` sides (q and k stacked, or one of them), ``n`` selected heads, ``M`` normal-form pairs
    over both segments (``m = ⌊r/2⌋`` per segment with a generator), ``K = 2M + r`` rounded up
    to a multiple of :data:`PROJ_COLUMNS`, ``Ls = hi − lo`` tokens in the span that is transformed.

    * ``proj`` ``(S, 1, n, D, K)``: ``[W_txt | W_img | U | 0-pad]``, ``W_seg = U·P_seg`` (the
      pairs folded into the basis), so one projection gives a token's pair coordinates ``d`` and
      its subspace coefficients ``c``;
    * ``back`` ``(S, 1, n, 2M, D)``: ``[W_txt | W_img]ᵀ``;
    * ``theta`` ``(S, 1, n, 1, M)``: ``α·θ_j`` of each pair;
    * ``mask`` ``(Ls, M)``: 1 where pair ``j`` belongs to the segment of token ``lo + t``, else 0;
    * ``gate_mask`` ``(Ls,)`` bool: tokens of a segment with a generator, or ``None`` when every
      token of the span is one (the span then is exactly the active segments);
    * ``heads`` ``(n,)``: the selected heads, or ``None`` when they are all heads in order;
    * ``lo``, ``hi``: the span; ``r0``, ``rank``: where ``c`` sits in the projection.
    """

    proj: Tensor
    back: Tensor
    theta: Tensor
    mask: Tensor
    gate_mask: Tensor | None
    heads: Tensor | None
    lo: int
    hi: int
    r0: int
    rank: int


class _Side:
    """Device copies of one side (q or k) of a block, and its normal form (float64, CPU)."""

    def __init__(self, block: BlockAdapter, which: str, device: torch.device, dtype: torch.dtype) -> None:
        heads = block.heads if which == "q" else block.k_heads
        self.rows = None if which == "q" else block.k_rows  # generator row of each key head
        self.heads = heads.to(device)
        self.n = int(heads.numel())
        self.max_head = int(heads.max())
        self.is_arange = bool((heads == torch.arange(heads.numel())).all())
        self.U_src = block.U_q if which == "q" else block.U_k
        self.U = self.U_src.detach().to(device, dtype)
        self.device, self.dtype = device, dtype
        self._folded: dict | None = None

    def generator(self, block: BlockAdapter, seg: str) -> Tensor | None:
        A = block.generator(seg)
        return A if A is None or self.rows is None else A[self.rows]

    def folded(self, block: BlockAdapter) -> dict:
        """float64 CPU ``proj: (n, D, K)`` = ``[W_txt | W_img | U | 0-pad]`` (``K``: see :class:`DenseOperators`),
        ``back: (n, 2M, D)``, ``theta: (n, M)``, ``cols[seg] = (j0, m)``: the segment's pairs are ``j0 … j0+m−1`` (columns
        ``2·j0 …`` of ``proj``), ``r0`` = first column of U.

        The closed form folds each segment's normal-form pairs into the basis: ``W_seg = U·P_seg``
        (``D × 2m``), so a token needs one projection ``xᵀ[W_txt | W_img | U]`` for both its rotation
        coordinates and its risk, and one back-projection ``Δd·[W_txt | W_img]ᵀ``.
        """
        if self._folded is None:
            r = block.rank
            Ud = self.U_src.detach().double()
            cols, thetas, pieces, start = {}, [], [], 0
            for seg in SEGMENTS:
                A = self.generator(block, seg)
                if A is None or r < 2:
                    continue
                P, th = normal_form(A)  # (n, r, 2m), (n, m) float64
                m = th.shape[-1]
                cols[seg] = (start // 2, m)  # first pair, pairs
                thetas.append(th)
                pieces.append(Ud @ P)  # (n, D, 2m)
                start += 2 * m
            pad = Ud.new_zeros(*Ud.shape[:-1], -(start + r) % PROJ_COLUMNS)  # K up to a multiple of PROJ_COLUMNS
            W = torch.cat(pieces, dim=-1) if pieces else Ud[..., :0]  # (n, D, 2M)
            theta = torch.cat(thetas, dim=-1) if thetas else Ud.new_zeros(Ud.shape[0], 0)  # (n, M)
            self._folded = {"proj": torch.cat([W, Ud, pad], dim=-1), "back": W.transpose(-1, -2),
                            "theta": theta, "cols": cols, "r0": start}
        return self._folded


class _Pack:
    """The folded operators of a tuple of sides, stacked on the device: ``proj (S,1,n,D,K)``,
    ``back (S,1,n,2M,D)``, ``theta (S,1,n,1,M)`` (unscaled)."""

    def __init__(self, proj: Tensor, back: Tensor, theta: Tensor, sides: list[_Side], cols: dict, r0: int) -> None:
        self.proj, self.back, self.theta = proj, back, theta
        self.sides, self.cols, self.r0 = sides, cols, r0
        self.pairs = int(theta.shape[-1])
        s0 = sides[0]  # the heads are equal for every side of a pack
        self.heads, self.n, self.is_arange = s0.heads, s0.n, s0.is_arange
        self._back_cat: Tensor | None = None

    @property
    def back_cat(self) -> Tensor:
        """``back`` of every side-head stacked: ``(S,1,n,2M,D)`` -> ``(S·n·2M, D)``."""
        if self._back_cat is None:
            self._back_cat = self.back.reshape(-1, self.back.shape[-1]).contiguous()
        return self._back_cat


class _Runtime:
    """Device copies of one block's tensors per side, and the folded operators (lazily).

    Valid while the block holds the very same tensor objects, unmodified in place; the runtime
    keeps references to them, so an object's identity cannot be recycled while it is cached.
    """

    def __init__(self, block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> None:
        self.sources = _sources(block)
        self.versions = _versions(self.sources)
        self.device, self.dtype = device, dtype
        self.side = {w: _Side(block, w, device, dtype) for w in WHICH}
        self._packs: dict[tuple, _Pack] = {}
        self._ops: dict[tuple, DenseOperators] = {}

    def valid_for(self, block: BlockAdapter) -> bool:
        now = _sources(block)
        return all(a is b for a, b in zip(now, self.sources)) and _versions(now) == self.versions

    def pack(self, block: BlockAdapter, which: tuple[str, ...]) -> _Pack:
        p = self._packs.get(which)
        if p is not None:
            return p
        if len(which) == 1 and block.kv_group == 1:  # a slice of the q-k pack: no second copy
            full = self.pack(block, WHICH)
            s = WHICH.index(which[0])
            p = _Pack(full.proj[s:s + 1], full.back[s:s + 1], full.theta[s:s + 1], [self.side[which[0]]],
                      full.cols, full.r0)
        else:
            sides = [self.side[w] for w in which]
            folded = [s.folded(block) for s in sides]
            dev = dict(device=self.device, dtype=self.dtype)
            proj = torch.stack([f["proj"] for f in folded]).unsqueeze(1).to(**dev).contiguous()  # (S,1,n,D,K)
            back = torch.stack([f["back"] for f in folded]).unsqueeze(1).to(**dev).contiguous()  # (S,1,n,2M,D)
            theta = torch.stack([f["theta"] for f in folded])[:, None, :, None, :].to(**dev).contiguous()  # (S,1,n,1,M)
            p = _Pack(proj, back, theta, sides, folded[0]["cols"], folded[0]["r0"])
        self._packs[which] = p
        return p

    def operators(self, block: BlockAdapter, which: tuple[str, ...], strength: float, H: int, L: int, txt_len: int,
                  img_first: bool, full: bool) -> DenseOperators:
        """The cached :class:`DenseOperators` for ``(…, H, L, D)`` tensors (``full``: the span is every token)."""
        key = (which, strength, H, L, txt_len, img_first, full)
        ops = self._ops.get(key)
        if ops is None:
            if len(self._ops) >= _MAX_CACHED_OPERATORS:
                self._ops.clear()
            ops = self._ops[key] = self._build(block, which, strength, H, L, txt_len, img_first, full)
        return ops

    def _build(self, block: BlockAdapter, which: tuple[str, ...], strength: float, H: int, L: int, txt_len: int,
               img_first: bool, full: bool) -> DenseOperators:
        p = self.pack(block, which)
        bounds = segment_bounds(L, txt_len, img_first)
        active = [s for s in SEGMENTS if block.generator(s) is not None and bounds[s][1] > bounds[s][0]]
        lo, hi = (0, L) if full else _active_span(bounds, active)
        # Built with device operations only: no host-to-device copy, no synchronisation.
        t = torch.arange(lo, hi, device=self.device)  # (Ls,) token positions
        mask = torch.zeros(hi - lo, p.pairs, device=self.device, dtype=self.dtype)  # (Ls, M)
        for seg, (start, m) in p.cols.items():
            a, b = bounds[seg]
            mask[:, start:start + m] = ((t >= a) & (t < b)).unsqueeze(-1).to(self.dtype)
        gate_mask = None
        if (lo, hi) != _active_span(bounds, active) or len(active) == 0:
            gate_mask = torch.zeros(hi - lo, dtype=torch.bool, device=self.device)
            for seg in active:
                a, b = bounds[seg]
                gate_mask |= (t >= a) & (t < b)
        return DenseOperators(proj=p.proj, back=p.back, theta=p.theta * strength, mask=mask, gate_mask=gate_mask,
                              heads=None if p.is_arange and p.n == H else p.heads,  # no gather for all heads in order
                              lo=lo, hi=hi, r0=p.r0, rank=block.rank)


def _sources(block: BlockAdapter) -> tuple:
    return (block.heads, block.U_q, block.U_k, block.A_txt, block.A_img, block.kv_group)


def _versions(sources: tuple) -> tuple:
    # Inference-mode tensors (ComfyUI runs nodes under torch.inference_mode()) have no version
    # counter; they cannot be modified in place outside inference mode, so identity suffices.
    return tuple(t._version if isinstance(t, Tensor) and not t.is_inference() else -1 for t in sources)


def _runtime(block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> _Runtime:
    key = (device, dtype)
    rt = block._runtime.get(key)
    if torch.compiler.is_compiling():
        # Traced by torch.compile: object identity is traced (and guarded), version counters are
        # not (dynamo would freeze them), so in-place edits of an adapter's tensors are seen by
        # eager calls only. Building the runtime is not traceable: a graph break, once.
        if rt is None or not all(a is b for a, b in zip(_sources(block), rt.sources)):
            rt = _new_runtime(block, device, dtype)
        return rt
    if rt is None or not rt.valid_for(block):
        rt = _new_runtime(block, device, dtype)
    return rt


def _new_runtime(block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> _Runtime:
    # Not traceable: under torch.compile a graph break. Wrapped here, not decorated at import, since
    # torch.compiler.disable imports torch._dynamo (seconds of every import of the engine); while
    # dynamo traces, it is loaded anyway.
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_build_runtime)(block, device, dtype)
    return _build_runtime(block, device, dtype)


def _build_runtime(block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> _Runtime:
    rt = block._runtime[(device, dtype)] = _Runtime(block, device, dtype)
    return rt


def dense_operators(block: BlockAdapter, x: Tensor, which: tuple[str, ...] = WHICH, *, txt_len: int,
                    img_first: bool = False, strength: float = 1.0, return_risk: bool = False) -> DenseOperators:
    """The cached operators :func:`fused_dense` uses for ``x`` (``(B, H, L, D)``, one side's shape).

    For callers that compile :func:`fused_dense` themselves: look them up outside the compiled
    region (the lookup validates the cache on the host), pass them in.
    """
    rt = _runtime(block, x.device, _compute_dtype(x))
    return rt.operators(block, which, strength, int(x.shape[1]), int(x.shape[2]), txt_len, img_first, return_risk)


# -- the dense transform (any device; no host reads) -------------------------------------------------

def _merges(t: Tensor, groups: tuple[tuple[int, ...], ...]) -> bool:
    """Whether each group of dimensions of ``t`` (in order, outermost first) views as one dimension."""
    for g in groups:
        dims = [(t.shape[d], t.stride()[d]) for d in g if t.shape[d] > 1]
        if not all(a_st == b_n * b_st for (_, a_st), (b_n, b_st) in zip(dims, dims[1:])):
            return False
    return True


_HEAD_MAJOR = ((0, 2), (1, 3))  # (S, n) -> batch, (B, Ls) -> rows
_SAMPLE_MAJOR = ((0, 1, 2),)  # (S, B, n) -> batch, Ls rows


def _head_major(t: Tensor) -> bool:
    """The batched products' layout for ``t`` ``(S, B, n, Ls, ·)``: ``(S·n, B·Ls, ·)`` (head-major:
    few large products, the operators need no copy per sample) when its memory allows, else
    ``(S·B·n, Ls, ·)``. Compiled graphs always use the head-major one (inductor lays out memory)."""
    return t.shape[1] == 1 or torch.compiler.is_compiling() or _merges(t, _HEAD_MAJOR)


def _view3(t: Tensor, head: bool) -> Tensor:
    """``(S, B, n, Ls, c)`` -> ``(S·n, B·Ls, c)`` (head-major) or ``(S·B·n, Ls, c)``; a view where the memory allows."""
    S, B, n, Ls, c = t.shape
    return t.transpose(1, 2).reshape(S * n, B * Ls, c) if head and B > 1 else t.reshape(S * B * n, Ls, c)


def _view5(t3: Tensor, shape: torch.Size, head: bool) -> Tensor:
    """Inverse of :func:`_view3` (a view): ``(G, R, c)`` -> ``(S, B, n, Ls, c)``."""
    S, B, n, Ls = shape[:4]
    return t3.view(S, n, B, Ls, -1).transpose(1, 2) if head and B > 1 else t3.view(S, B, n, Ls, -1)


def _operator3(op: Tensor, B: int, head: bool) -> Tensor:
    """Per-head operator ``(S, 1, n, a, b)`` for the batched products: ``(S·n, a, b)`` (a view), or
    repeated per sample ``(S·B·n, a, b)`` (a copy when ``B > 1``)."""
    S, _, n, a, b = op.shape
    return op.view(S * n, a, b) if head or B == 1 else op.expand(S, B, n, a, b).reshape(S * B * n, a, b)


def _stage1(Xc: Tensor, ops: DenseOperators, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Projection and risk: ``Y = X·proj``, ``ρ = (‖c‖ / max(‖x‖, 1e-6))²``, ``gate = ρ > τ``.

    ``Xc`` ``(S, B, n, Ls, D)`` in the compute dtype -> ``Y (S,B,n,Ls,K)``, ``ρ``, ``gate`` ``(S,B,n,Ls)``.
    ``ρ ≤ 1`` up to rounding (``U`` is orthonormal); callers that report it clamp it (:func:`_transform`).
    Two norms and a division of ``(…, Ls)`` values: no per-coefficient division, no reduction over ``r`` products.
    """
    head = _head_major(Xc)
    X3 = _view3(Xc, head)  # (G, R, D): the layout of the product (a copy where Xc's memory has another)
    Y3 = torch.bmm(X3, _operator3(ops.proj, Xc.shape[1], head))  # (G,R,D) @ (G,D,K) -> (G,R,K)
    norm = torch.linalg.vector_norm(X3, dim=-1, keepdim=True).clamp_min(_EPS_NORM)  # (G,R,1)
    rho3 = (torch.linalg.vector_norm(Y3[..., ops.r0:ops.r0 + ops.rank], dim=-1, keepdim=True) / norm).square()
    Y, rho = _view5(Y3, Xc.shape, head), _view5(rho3, Xc.shape, head)[..., 0]  # (S,B,n,Ls,K), (S,B,n,Ls)
    gate = rho > threshold
    if ops.gate_mask is not None:  # only with a risk map over tokens of segments without a generator
        gate = gate & ops.gate_mask
    return Y, rho, gate


def _stage2(Xc: Tensor, Y: Tensor, rho: Tensor, ops: DenseOperators, inplace: bool = False) -> Tensor:
    """Rotated span ``x + W·(mask ⊙ (e^{iαρθ} − 1) ⊙ z)`` for every token (gated or not).

    ``z_j = d_{2j} + i·d_{2j+1}`` are the pair coordinates from ``Y``; the mask keeps each token's
    own segment's pairs (the others get ``polar(0, φ) − 0 = 0``). -> ``(S, B, n, Ls, D)``:
    ``Xc`` itself, updated in place, with ``inplace``, else a new tensor.
    """
    M = ops.theta.shape[-1]
    phi = rho.unsqueeze(-1) * ops.theta  # (S,B,n,Ls,1) * (S,1,n,1,M) -> (S,B,n,Ls,M): α·ρ·θ_j
    if torch.compiler.is_compiling():
        dd = _pair_deltas_real(Y[..., :2 * M], phi, ops.mask)  # inductor fuses real arithmetic, not complex
    else:
        z = torch.view_as_complex(Y[..., :2 * M].unflatten(-1, (M, 2)))  # (S,B,n,Ls,M) pairs as a + ib
        rot = torch.polar(ops.mask, phi) - ops.mask  # mask·(e^{iφ} − 1); (Ls,M) broadcasts
        dd = torch.view_as_real(z * rot).flatten(-2)  # (S,B,n,Ls,M,2) -> (S,B,n,Ls,2M)
    head = _head_major(Xc)
    dd3, back3 = _view3(dd, head), _operator3(ops.back, Xc.shape[1], head)  # (G,R,2M), (G,2M,D)
    if inplace and not torch.compiler.is_compiling() and _merges(Xc, _HEAD_MAJOR if head else _SAMPLE_MAJOR):
        _view3(Xc, head).baddbmm_(dd3, back3)  # a view of Xc: x += Δd·Wᵀ in place
        return Xc
    return _view5(torch.baddbmm(_view3(Xc, head), dd3, back3), Xc.shape, head)  # x + Δd·Wᵀ


def _pair_deltas_real(d: Tensor, phi: Tensor, mask: Tensor) -> Tensor:
    """:func:`_stage2`'s ``mask·(e^{iφ} − 1)·z`` in real arithmetic (what ``torch.compile`` traces).

    ``d`` ``(…, 2M)`` pair coordinates ``(a_j, b_j)``, ``phi`` ``(…, M)``, ``mask`` ``(Ls, M)``:
    ``Δa = a·c − b·s``, ``Δb = a·s + b·c`` with ``c = mask·(cos φ − 1) = −2·mask·sin²(φ/2)``,
    ``s = mask·sin φ``. -> ``(…, 2M)``.
    """
    a, b = d[..., 0::2], d[..., 1::2]  # (…, M) each
    half = torch.sin(0.5 * phi)
    c = -2.0 * half * half * mask
    s = torch.sin(phi) * mask
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)  # (…, M, 2) -> (…, 2M)


def _rotate_write(X: Tensor, Xh: Tensor, Xs: Tensor, Xc: Tensor, Y: Tensor, rho: Tensor, gate: Tensor,
                  ops: DenseOperators, write: bool, all_gated: bool = False) -> Tensor:
    """Rotate the gated tokens; every other element of ``X`` stays bit-identical. -> ``(S, B, H, L, D)``.

    ``write``: ``X`` is the engine's own (stacked, or the caller's with ``inplace``) and autograd is
    off: the gated tokens are written into it (one masked write), else a new tensor is built.
    ``all_gated`` (known on the CPU only): every token of the span is gated, so no selection is needed.
    """
    g = gate.unsqueeze(-1)  # (S,B,n,Ls,1)
    if write and not torch.compiler.is_compiling():  # compiled graphs are functional anyway (and refuse strided out=)
        if all_gated:  # x' = x + Δ for every token: in place (in X, or in its compute-dtype copy)
            new = _stage2(Xc, Y, rho, ops, inplace=True)
            if new is not Xs:
                Xs.copy_(new)  # the cast back
        else:  # a compute-dtype copy is the engine's own: rotate it in place, then select
            new = _stage2(Xc, Y, rho, ops, inplace=Xc is not Xs)
            torch.where(g, new.to(Xs.dtype), Xs, out=Xs)  # ungated tokens: Xs itself
        if ops.heads is not None:
            X.index_copy_(2, ops.heads, Xh)
        return X
    new = _stage2(Xc, Y, rho, ops)
    ys = (new if all_gated else torch.where(g, new, Xc)).to(X.dtype)  # (S,B,n,Ls,D)
    if (ops.lo, ops.hi) != (0, X.shape[3]):
        ys = torch.cat((Xh[..., :ops.lo, :], ys, Xh[..., ops.hi:, :]), dim=3)  # (S,B,n,L,D)
    return ys if ops.heads is None else X.index_copy(2, ops.heads, ys)


def _split(X: Tensor, ops: DenseOperators) -> tuple[Tensor, Tensor, Tensor]:
    """``Xh (S,B,n,L,D)`` selected heads, ``Xs`` their span (a view), ``Xc`` that in the compute dtype.

    ``Xc`` is ``Xs`` itself for float32/float64 inputs whose memory suits the batched products (one
    of the layouts of :func:`_head_major`); other layouts (a ``(B, L, H, D)`` tensor seen as
    ``(B, H, L, D)``, diffusers' hooks, on part of the tokens, ``B > 1``) get one head-major copy
    instead of a copy in every product.
    """
    Xh = X if ops.heads is None else X.index_select(2, ops.heads)
    Xs = Xh[..., ops.lo:ops.hi, :]  # (S,B,n,Ls,D) view
    Xc = Xs.to(_compute_dtype(X))
    if not (torch.compiler.is_compiling() or _head_major(Xc) or _merges(Xc, _SAMPLE_MAJOR)):
        Xc = Xc.transpose(1, 2).contiguous().transpose(1, 2)  # (S,n,B,Ls,D) memory, (S,B,n,Ls,D) view
    return Xh, Xs, Xc


def fused_dense(X: Tensor, ops: DenseOperators, threshold: float, write: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """SafeRoPE of stacked queries and keys (or one tensor) with precomputed operators, on any device.

    Args:
        X: ``(S, B, H, L, D)``: ``torch.stack((q, k))`` (``S = 2``) or ``x.unsqueeze(0)``; any float dtype
            (computed in float32, float64 stays float64).
        ops: from :func:`dense_operators` (the same side tuple, strength and layout).
        threshold: ``τ``.
        write: ``X`` may be overwritten (the caller owns it and autograd does not record): the
            rotated tokens are written into it and ``X`` itself is returned.

    Returns:
        ``(X', ρ, gate)``: ``X'`` ``(S, B, H, L, D)`` in ``X``'s dtype, ungated tokens and unselected
        heads bit-identical; ``ρ`` and ``gate`` ``(S, B, n, Ls)`` over the span ``ops.lo:ops.hi``
        (``ρ`` unclamped: rounding may take it a few ulps past 1; clamp it to report it).

    Reads nothing back to the host and traces with ``torch.compile(fullgraph=True)``.
    """
    Xh, Xs, Xc = _split(X, ops)
    Y, rho, gate = _stage1(Xc, ops, threshold)
    return _rotate_write(X, Xh, Xs, Xc, Y, rho, gate, ops, write), rho, gate


def _sparse(Xc: Tensor, Y: Tensor, rho: Tensor, pack: _Pack, ops: DenseOperators, idx: tuple[Tensor, ...]) -> Tensor:
    """The CPU's gathered path: new values ``(G, D)`` of the ``G`` gated tokens ``idx = (s, b, h, t)``.

    Each row's rotated pair deltas go into its own side-head's block of a ``(G, S·n·2M)`` row
    (zeros elsewhere), so one product with every side-head's back-projection stacked writes them
    back — on the CPU cheaper than gathering a ``2M × D`` operator per row for ``G`` tiny products.
    """
    S, _, n, _, D = Xc.shape
    s, _, h, t = idx
    M, G = ops.theta.shape[-1], int(h.numel())
    op = s * n + h if S > 1 else h  # (G,) side-head of each row
    rows = torch.arange(G, device=Xc.device)
    z = torch.view_as_complex(Y[idx][:, :2 * M].unflatten(-1, (M, 2)))  # (G, M) pairs as a + ib
    phi = rho[idx].unsqueeze(-1) * ops.theta.view(S * n, M)[op]  # (G,1) * (G,M): α·ρ·θ_j
    mask = ops.mask[t]  # (G, M)
    dd = Xc.new_zeros(G, S * n, 2 * M)  # each row's Δd in its own side-head's block, 0 elsewhere
    dd[rows, op] = torch.view_as_real(z * (torch.polar(mask, phi) - mask)).flatten(-2)  # (G, 2M)
    return torch.addmm(Xc[idx], dd.view(G, -1), pack.back_cat)  # x + Δd·Wᵀ: (G,S·n·2M) @ (S·n·2M,D) -> (G,D)


def _reported(rho: Tensor | None, wanted: bool) -> Tensor | None:
    """``ρ`` as reported (``clamp(·, 0, 1)``, rounding can pass 1), or ``None`` when not wanted."""
    return rho.clamp(0.0, 1.0) if wanted and rho is not None else None


# -- entry points -----------------------------------------------------------------------------------

def _check(x: Tensor, block: BlockAdapter, txt_len: int, strength: float, threshold: float) -> None:
    if x.ndim != 4:
        raise ValueError(f"q and k must be (B, H, L, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"q and k must be floating point, got {x.dtype}")
    L, D = x.shape[2], x.shape[3]
    if D != block.head_dim:
        raise ValueError(f"block {block.key}: head dim of q/k is {D}, adapter has {block.head_dim}")
    if not (isinstance(txt_len, int) and 0 <= txt_len <= L):
        raise ValueError(f"txt_len must be an int in [0, {L}], got {txt_len!r}")
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(f"strength must be finite and ≥ 0, got {strength!r}")
    if not (0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")


def saferope_qk(q: Tensor, k: Tensor, block: BlockAdapter, *, txt_len: int, img_first: bool = False,
                strength: float = 1.0, threshold: float, return_risk: bool = False, inplace: bool = False):
    """Apply SafeRoPE to the queries and keys of one block.

    Args:
        q, k: ``(B, H, L, D)`` post-QK-norm, pre-RoPE (``k`` may have fewer heads under
            grouped-query attention), ``txt_len`` text tokens first, then the image tokens
            (reference-image tokens included) — or the image tokens first with ``img_first``.
            Any float dtype; the transform runs in float32 (float64 stays float64) and is cast back.
        block: the adapter's parameters for this block.
        txt_len: number of text tokens (``L`` for a text-only tensor, 0 for image-only).
        strength: ``α ≥ 0``; 0 returns the inputs unchanged.
        threshold: ``τ ∈ [0, 1)``.
        return_risk: also return a :class:`BlockRisk`.
        inplace: the caller owns ``q`` and ``k`` (fresh intermediates nobody else reads) and lets
            the rotated tokens be written into them, saving a copy of each. Ignored while autograd
            records (training, or inputs that require grad).

    Returns:
        ``(q', k')`` or ``(q', k', BlockRisk)``. Outputs are the input objects when nothing changed
        (known without a device read: strength 0, no generator for the tokens; on the CPU also no
        gated token), new tensors (or, with ``inplace``, possibly the inputs) otherwise.
        Differentiable with respect to ``x`` and, when the generators require grad, with respect
        to them (a scaled Taylor series replaces the closed form then).

    Queries and keys of equal shape, dtype and device go through one fused pass (stacked); keys
    with fewer heads (grouped-query attention) and the training path go through
    :func:`saferope_x` once per tensor.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must both be (B, H, L, D) with equal B, L, D, got {tuple(q.shape)} and {tuple(k.shape)}")
    fused = (q.shape == k.shape and q.dtype == k.dtype and q.device == k.device and block.kv_group == 1
             and not (torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (block.A_txt, block.A_img))))
    if fused:
        (q2, k2), rho, gate = _transform((q, k), WHICH, block, txt_len=txt_len, img_first=img_first, strength=strength,
                                         threshold=threshold, return_risk=return_risk, inplace=inplace and q is not k)
        if not return_risk:
            return q2, k2
        rho_q, rho_k, gate_q, gate_k = rho[0], rho[1], gate[0], gate[1]
    else:
        inplace = inplace and q is not k
        outs = [saferope_x(x, block, w, txt_len=txt_len, img_first=img_first, strength=strength, threshold=threshold,
                           return_risk=return_risk, inplace=inplace) for x, w in ((q, "q"), (k, "k"))]
        if not return_risk:
            return outs[0], outs[1]
        (q2, rho_q, gate_q), (k2, rho_k, gate_k) = outs
    rt = _runtime(block, q.device, _compute_dtype(q))
    risk = BlockRisk(heads=rt.side["q"].heads, txt_len=txt_len, rho_q=rho_q.float(), rho_k=rho_k.float(),
                     gated_q=gate_q, gated_k=gate_k, heads_k=rt.side["k"].heads, img_first=img_first)
    return q2, k2, risk


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def saferope_x(x: Tensor, block: BlockAdapter, which: str, *, txt_len: int, img_first: bool = False,
               strength: float = 1.0, threshold: float, return_risk: bool = False, inplace: bool = False):
    """Apply SafeRoPE to the queries (``which="q"``) or the keys (``"k"``) of one block.

    Same arguments as :func:`saferope_qk` for one tensor ``x`` ``(B, H, L, D)``. Returns ``x'``, or
    ``(x', rho, gate)`` with ``return_risk`` (``(B, n, L)`` each, over every token).
    """
    if which not in WHICH:
        raise ValueError(f"which must be 'q' or 'k', got {which!r}")
    (out,), rho, gate = _transform((x,), (which,), block, txt_len=txt_len, img_first=img_first, strength=strength,
                                   threshold=threshold, return_risk=return_risk, inplace=inplace)
    return (out, rho[0], gate[0]) if return_risk else out


def _active_span(bounds: dict, active: list | tuple) -> tuple[int, int]:
    """Smallest token range holding every active segment (text-only adapters skip the image)."""
    if not active:
        return 0, 0
    return min(bounds[s][0] for s in active), max(bounds[s][1] for s in active)


def _transform(xs: tuple[Tensor, ...], which: tuple[str, ...], block: BlockAdapter, *, txt_len: int, img_first: bool,
               strength: float, threshold: float, return_risk: bool, inplace: bool):
    """SafeRoPE of ``xs`` (q and k of equal shape, or one tensor) -> ``(outs, ρ, gate)``.

    ``ρ`` and ``gate`` are ``(S, B, n, L)`` over every token with ``return_risk``, else ``None``.
    """
    x0 = xs[0]
    _check(x0, block, txt_len, strength, threshold)
    L = int(x0.shape[2])
    bounds = segment_bounds(L, txt_len, img_first)
    active = tuple(s for s in SEGMENTS if block.generator(s) is not None and bounds[s][1] > bounds[s][0])
    if not return_risk and (strength == 0.0 or not active):
        return xs, None, None

    cdtype = _compute_dtype(x0)
    rt = _runtime(block, x0.device, cdtype)
    for w in which:
        side = rt.side[w]
        if side.max_head >= x0.shape[1]:
            raise ValueError(f"block {block.key}: adapter selects {w} head {side.max_head}, the tensor has {x0.shape[1]} heads")
    grad = torch.is_grad_enabled()
    if grad and any(block.generator(s).requires_grad for s in active):
        return _train(xs[0], block, rt.side[which[0]], bounds, active, strength, threshold, return_risk)

    autograd = grad and any(x.requires_grad for x in xs)
    inplace = inplace and not autograd
    pack = rt.pack(block, which)
    rotate = strength != 0.0 and pack.pairs > 0 and bool(active)  # rank 1: no pair to rotate
    if not (rotate or return_risk):
        return xs, None, None
    ops = rt.operators(block, which, strength, int(x0.shape[1]), L, txt_len, img_first, return_risk)
    S = len(xs)
    X = torch.stack(xs) if S > 1 else x0.unsqueeze(0)  # (S,B,H,L,D); a stack is the engine's own
    write = (S > 1 or inplace) and not autograd

    if not rotate:  # the risk map only
        _, _, Xc = _split(X, ops)
        _, rho, gate = _stage1(Xc, ops, threshold)
        return xs, _reported(rho, True), gate
    if not (HOST_SHORTCUTS and X.device.type == "cpu") or torch.compiler.is_compiling():
        out, rho, gate = fused_dense(X, ops, threshold, write)
        return (xs if out is X and S == 1 else tuple(out.unbind(0))), _reported(rho, return_risk), gate

    # CPU: reading the gate is free.
    Xh, Xs, Xc = _split(X, ops)
    Y, rho, gate = _stage1(Xc, ops, threshold)
    idx = gate.nonzero(as_tuple=True)  # (s, b, head, token) of the G gated tokens
    G = int(idx[0].numel())
    if G == 0:
        return xs, _reported(rho, return_risk), gate
    if G > SPARSE_MAX_SHARE * gate.numel():
        out = _rotate_write(X, Xh, Xs, Xc, Y, rho, gate, ops, write, all_gated=G == gate.numel())
        return (xs if out is X and S == 1 else tuple(out.unbind(0))), _reported(rho, return_risk), gate
    values = _sparse(Xc, Y, rho, pack, ops, idx).to(x0.dtype)  # (G, D)
    s, b, h, t = idx
    heads = h if ops.heads is None else ops.heads[h]
    if ops.lo:
        t = t + ops.lo
    if S > 1 and write and not inplace:  # into the stack (the engine's own; autograd may still need it otherwise)
        X.index_put_((s, b, heads, t), values)
        return tuple(X.unbind(0)), _reported(rho, return_risk), gate
    outs = xs if inplace else tuple(x.clone() for x in xs)  # ungated tokens: exact copies (or untouched, in place)
    for i, dst in enumerate(outs):
        sel = (slice(None),) if S == 1 else (s == i,)
        dst.index_put_((b[sel], heads[sel], t[sel]), values[sel])
    return outs, _reported(rho, return_risk), gate


def _train(x: Tensor, block: BlockAdapter, side: _Side, bounds: dict, active: tuple, strength: float,
           threshold: float, return_risk: bool):
    """Training path of one tensor (generators require grad): the differentiable series."""
    all_heads = side.is_arange and side.n == x.shape[1]
    xs = x if all_heads else x.index_select(1, side.heads)  # (B,H,L,D) -> (B,n,L,D)
    y, rho, gate = _series(xs.to(_compute_dtype(x)), block, side, bounds, active, strength, threshold)
    if y is None:
        out = x
    else:
        y = y.to(x.dtype)
        out = y if all_heads else x.index_copy(1, side.heads, y)
    return (out,), (rho.unsqueeze(0) if return_risk else None), (gate.unsqueeze(0) if return_risk else None)


def _nothing_to_do(x: Tensor, gate: Tensor, strength: float) -> bool:
    # .any() synchronises with the device, so the early exit is taken on the CPU only, where it is free.
    return strength == 0.0 or (x.device.type == "cpu" and not bool(gate.any()))


def _series(xf: Tensor, block: BlockAdapter, side: _Side, bounds: dict, active: tuple,
            strength: float, threshold: float):
    """Training path: differentiable in the generators (scaled Taylor series on the coefficients)."""
    rho, c = latent_risk(xf, side.U)  # (B,n,L), (B,n,L,r)
    gate = rho > threshold
    for seg in SEGMENTS:
        if seg not in active:
            a, b = bounds[seg]
            gate[..., a:b] = False
    if _nothing_to_do(xf, gate, strength):
        return None, rho, gate
    s = torch.where(gate, strength * rho, torch.zeros_like(rho))
    parts = []
    for seg in sorted(SEGMENTS, key=lambda sg: bounds[sg][0]):  # in token order
        a, b = bounds[seg]
        if b <= a:
            continue
        if seg not in active:
            parts.append(torch.zeros_like(c[..., a:b, :]))
        else:
            A = side.generator(block, seg).to(xf.device, xf.dtype)
            parts.append(expm_apply_series(c[..., a:b, :], A, s[..., a:b]) - c[..., a:b, :])
    dc = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B,n,L,r)
    dx = torch.matmul(dc, side.U.transpose(-1, -2))  # (B,n,L,r) @ (n,r,D) -> (B,n,L,D)
    return torch.where(gate.unsqueeze(-1), xf + dx, xf), rho, gate

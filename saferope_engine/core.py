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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import SEGMENTS, BlockAdapter
from .rotation import expm_apply_series, normal_form

__all__ = ["BlockRisk", "saferope_qk", "saferope_x", "latent_risk", "segment_bounds"]

_EPS = 1e-12
WHICH = ("q", "k")


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


class _Side:
    """Device copies of one side (q or k) of a block, and its folded closed-form operators."""

    def __init__(self, block: BlockAdapter, which: str, device: torch.device, dtype: torch.dtype) -> None:
        heads = block.heads if which == "q" else block.k_heads
        self.rows = None if which == "q" else block.k_rows  # generator row of each key head
        self.heads = heads.to(device)
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
        """``proj: (n, D, K)`` = ``[W_txt | W_img | U | 0-pad]`` (K even), ``back: (n, 2M, D)``,
        ``cols[seg] = (start, m)`` of the segment's pairs, ``theta[seg]: (n, m)``, ``r0`` = first column of U.

        The closed form folds each segment's normal-form pairs into the basis: ``W_seg = U·P_seg``
        (``D × 2m``), so a token needs one projection ``xᵀ[W_txt | W_img | U]`` for both its rotation
        coordinates and its risk, and one back-projection ``Δd·[W_txt | W_img]ᵀ``.
        """
        if self._folded is None:
            r = block.rank
            Ud = self.U_src.detach().double()
            cols, theta, pieces, start = {}, {}, [], 0
            for seg in SEGMENTS:
                A = self.generator(block, seg)
                if A is None or r < 2:
                    continue
                P, th = normal_form(A)  # (n, r, 2m), (n, m) float64
                m = th.shape[-1]
                cols[seg], theta[seg] = (start, m), th.to(self.device, self.dtype)
                pieces.append(Ud @ P)  # (n, D, 2m)
                start += 2 * m
            pad = Ud.new_zeros(*Ud.shape[:-1], (start + r) % 2)  # keep K even: complex views need it
            W = torch.cat(pieces, dim=-1) if pieces else Ud[..., :0]  # (n, D, 2M)
            self._folded = {"proj": torch.cat([W, Ud, pad], dim=-1).to(self.device, self.dtype).contiguous(),
                            "back": W.transpose(-1, -2).to(self.device, self.dtype).contiguous(),  # (n, 2M, D)
                            "cols": cols, "theta": theta, "r0": start}
        return self._folded


class _Runtime:
    """Device copies of one block's tensors per side, and the folded operators (lazily).

    Valid while the block holds the very same tensor objects, unmodified in place; the runtime
    keeps references to them, so an object's identity cannot be recycled while it is cached.
    """

    def __init__(self, block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> None:
        self.sources = _sources(block)
        self.versions = _versions(self.sources)
        self.side = {w: _Side(block, w, device, dtype) for w in WHICH}

    def valid_for(self, block: BlockAdapter) -> bool:
        now = _sources(block)
        return all(a is b for a, b in zip(now, self.sources)) and _versions(now) == self.versions


def _sources(block: BlockAdapter) -> tuple:
    return (block.heads, block.U_q, block.U_k, block.A_txt, block.A_img, block.kv_group)


def _versions(sources: tuple) -> tuple:
    # Inference-mode tensors (ComfyUI runs nodes under torch.inference_mode()) have no version
    # counter; they cannot be modified in place outside inference mode, so identity suffices.
    return tuple(t._version if isinstance(t, Tensor) and not t.is_inference() else -1 for t in sources)


def _runtime(block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> _Runtime:
    key = (str(device), dtype)
    rt = block._runtime.get(key)
    if rt is None or not rt.valid_for(block):
        rt = _Runtime(block, device, dtype)
        block._runtime[key] = rt
    return rt


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
        ``(q', k')`` or ``(q', k', BlockRisk)``. Outputs are new tensors when anything changed and
        the input objects otherwise. Differentiable with respect to ``x`` and, when the generators
        require grad, with respect to them (a scaled Taylor series replaces the closed form then).
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must both be (B, H, L, D) with equal B, L, D, got {tuple(q.shape)} and {tuple(k.shape)}")
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
    _check(x, block, txt_len, strength, threshold)
    L = x.shape[2]
    bounds = segment_bounds(L, txt_len, img_first)
    active = tuple(s for s in SEGMENTS if block.generator(s) is not None and bounds[s][1] > bounds[s][0])
    if not return_risk and (strength == 0.0 or not active):
        return x

    cdtype = _compute_dtype(x)
    side = _runtime(block, x.device, cdtype).side[which]
    if side.max_head >= x.shape[1]:
        raise ValueError(f"block {block.key}: adapter selects {which} head {side.max_head}, the tensor has {x.shape[1]} heads")
    all_heads = side.is_arange and side.heads.numel() == x.shape[1]  # no gather/scatter needed
    train = torch.is_grad_enabled() and any(block.generator(s).requires_grad for s in active)
    inplace = inplace and not train and not (torch.is_grad_enabled() and x.requires_grad)
    xs = x if all_heads else x.index_select(1, side.heads)  # (B,H,L,D) -> (B,n,L,D)
    xc = xs.to(cdtype)  # xs itself for float32 inputs
    if train:
        y, rho, gate = _series(xc, block, side, bounds, active, strength, threshold)
    else:
        y, rho, gate = _closed(xc, block, side, bounds, active, strength, threshold,
                               full_risk=return_risk, inplace=inplace and xc is xs)
    if y is None:  # nothing rotated
        out = x
    else:
        y = y.to(x.dtype)
        out = y if all_heads else (x.index_copy_(1, side.heads, y) if inplace else x.index_copy(1, side.heads, y))
    return (out, rho, gate) if return_risk else out


def _nothing_to_do(x: Tensor, gate: Tensor, strength: float) -> bool:
    # .any() synchronises with the device, so the early exit is taken on the CPU only, where it is free.
    return strength == 0.0 or (x.device.type == "cpu" and not bool(gate.any()))


#: On the CPU the inference path updates only the gated tokens (gathered: usually a few prompt
#: tokens) when they are at most this share of the span; elsewhere it stays dense, because
#: finding them would synchronise with the device. 0 disables the sparse path.
SPARSE_MAX_SHARE = 0.25


def _active_span(bounds: dict, active: tuple) -> tuple[int, int]:
    """Smallest token range holding every active segment (text-only adapters skip the image)."""
    if not active:
        return 0, 0
    return min(bounds[s][0] for s in active), max(bounds[s][1] for s in active)


def _closed(xf: Tensor, block: BlockAdapter, side: _Side, bounds: dict, active: tuple,
            strength: float, threshold: float, full_risk: bool = False, inplace: bool = False):
    """Inference path: closed-form rotations from the folded normal form (no per-token r×r matrix).

    Works on the token span of the active segments only; returns ``(x' or None, ρ, gate)``, ρ and
    gate over that span, or over every token with ``full_risk`` (the risk map; same ``x'``).
    """
    f = side.folded(block)
    r0, r = f["r0"], block.rank
    L = xf.shape[2]
    lo, hi = _active_span(bounds, active)
    xs = xf[:, :, lo:hi]  # (B,n,L,D) -> (B,n,Ls,D) view
    rel = {seg: (min(max(a - lo, 0), hi - lo), min(max(b - lo, 0), hi - lo)) for seg, (a, b) in bounds.items()}
    y = torch.matmul(xs, f["proj"])  # (B,n,Ls,D) @ (n,D,K) -> (B,n,Ls,K): [d_txt | d_img | c | pad]
    rho = _rho(y[..., r0:r0 + r], xs)  # (B,n,Ls)
    gate = rho > threshold  # every token of the span is in an active segment
    if full_risk and (lo, hi) != (0, L):  # the risk map covers every token; nothing outside the span is gated
        rho_all = torch.cat([latent_risk(xf[:, :, :lo], side.U)[0], rho,
                             latent_risk(xf[:, :, hi:], side.U)[0]], dim=2)  # (B,n,L)
        gate_all = torch.zeros_like(rho_all, dtype=torch.bool)
        gate_all[:, :, lo:hi] = gate
        ret_rho, ret_gate = rho_all, gate_all
    else:
        ret_rho, ret_gate = rho, gate
    if strength == 0.0 or not f["cols"]:
        return None, ret_rho, ret_gate
    # On the CPU the gated tokens' positions are free to read: none -> nothing to do; few -> gather them.
    idx = gate.nonzero(as_tuple=True) if xf.device.type == "cpu" else None  # (b, head, token) of G gated tokens
    if idx is not None and idx[0].numel() == 0:
        return None, ret_rho, ret_gate
    s = torch.where(gate, strength * rho, torch.zeros_like(rho))  # (B,n,Ls) angle scale, exactly 0 where ungated
    if idx is not None and idx[0].numel() <= SPARSE_MAX_SHARE * gate.numel():
        out = xf if inplace else xf.clone()  # ungated tokens: exact copies (or untouched, in place)
        seg_of = {seg: (idx[2] >= rel[seg][0]) & (idx[2] < rel[seg][1]) for seg in f["cols"]}  # (G,) each
        dd = _pair_deltas(y[idx], s[idx], f, seg_of, idx[1])  # (G,K), (G,) -> (G,2M)
        dx = torch.bmm(dd.unsqueeze(1), f["back"][idx[1]]).squeeze(1)  # (G,1,2M) @ (G,2M,D) -> (G,D)
        span = out[:, :, lo:hi]  # a view: assigning through it writes into out
        span[idx] = xs[idx] + dx  # the right side is gathered before the write
        return out, ret_rho, ret_gate
    seg_of = {seg: _span_mask(*rel[seg], like=s) for seg in f["cols"]}  # (Ls,) each
    dd = _pair_deltas(y, s, f, seg_of, None)  # (B,n,Ls,2M)
    dx = torch.matmul(dd, f["back"])  # (B,n,Ls,2M) @ (n,2M,D) -> (B,n,Ls,D)
    new = torch.where(gate.unsqueeze(-1), dx.add_(xs), xs)  # x + Δx; ungated tokens: exact copies
    if (lo, hi) != (0, L):
        new = torch.cat([xf[:, :, :lo], new, xf[:, :, hi:]], dim=2)  # (B,n,L,D)
    return new, ret_rho, ret_gate


def _pair_deltas(y: Tensor, s: Tensor, f: dict, seg_of: dict, head: Tensor | None) -> Tensor:
    """``(e^{i·s·θ} − 1)·z`` for every normal-form pair ``z = d_{2j} + i·d_{2j+1}``, as real ``(…, 2M)``.

    ``y``: ``(…, K)`` projections, ``s``: ``(…)`` angle scales, ``seg_of[seg]``: where a token belongs to
    ``seg`` (broadcasts against ``s``); ``head``: per-token head index (gathered tokens) or ``None``
    (dense ``(B,n,Ls)`` layout, θ broadcast over heads).
    """
    parts = []
    for seg, (start, m) in f["cols"].items():
        theta = f["theta"][seg]  # (n, m)
        th = theta[head] if head is not None else theta.unsqueeze(1)  # (G,m) | (n,1,m)
        s_seg = s if len(f["cols"]) == 1 else s * seg_of[seg]  # s is 0 outside the span's active segments
        z = torch.view_as_complex(y[..., start:start + 2 * m].unflatten(-1, (m, 2)))  # (…,m) pairs as a + ib
        phi = s_seg.unsqueeze(-1) * th  # (…,1) * θ -> (…,m)
        rot = torch.polar(torch.ones_like(phi), phi)  # e^{iφ}
        parts.append(torch.view_as_real(z * (rot - 1)).flatten(-2))  # (…,m,2) -> (…,2m)
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (…,2M)


def _span_mask(a: int, b: int, like: Tensor) -> Tensor:
    m = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    m[a:b] = 1
    return m


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

"""The SafeRoPE transform of one attention block (design §2).

For a token vector ``x ∈ R^D`` (a query or a key, after QK-norm, before RoPE) of a selected head:

    c  = Uᵀ x                                   coefficients in the unsafe subspace (R^r)
    ρ  = clamp(‖c‖² / max(‖x‖², 1e-12), 0, 1)   Latent Risk Score
    g  = ρ if ρ > τ else 0                      hard gate
    x' = x + U (exp(α·g·A) − I) c               rotate the in-subspace component only

Queries use ``U_q``, keys ``U_k``; both use the generator ``A`` of their head and segment (text
tokens ``A_txt``, image tokens ``A_img``). Tokens with ``g = 0``, every token when ``α = 0``,
unselected heads and segments without a generator come out bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import SEGMENTS, BlockAdapter
from .rotation import expm_apply_series, normal_form

__all__ = ["BlockRisk", "saferope_qk", "latent_risk"]

_EPS = 1e-12


@dataclass
class BlockRisk:
    """Per-token risk of one block, for the selected heads only.

    ``rho_*`` are ``(B, n, L)`` float32 Latent Risk Scores; ``gated_*`` are ``(B, n, L)`` bool,
    true where ``ρ > τ`` in a segment that has a generator (the tokens the rotation acts on
    when ``strength > 0``). ``heads`` is ``(n,)``; ``txt_len`` splits ``L`` into text | image.
    """

    heads: Tensor
    txt_len: int
    rho_q: Tensor
    rho_k: Tensor
    gated_q: Tensor
    gated_k: Tensor


def latent_risk(x: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """LRS of ``(B, n, L, D)`` vectors against ``(n, D, r)`` bases. Returns ``(rho, c)``."""
    c = torch.matmul(x, U)  # (B,n,L,D) @ (n,D,r) -> (B,n,L,r)
    return _rho(c, x), c


def _rho(c: Tensor, x: Tensor) -> Tensor:
    """``clamp(‖c‖² / ‖x‖², 0, 1)``: ``c`` ``(…, r)`` coefficients of ``x`` ``(…, D)`` -> ``(…)``."""
    energy = torch.linalg.vector_norm(x, dim=-1).square()  # one pass over x
    return (c.square().sum(-1) / energy.clamp_min(_EPS)).clamp(0.0, 1.0)


class _Runtime:
    """Device copies of one block's tensors, and the folded closed-form operators (lazily).

    Valid while the block holds the very same tensor objects, unmodified in place; the runtime
    keeps references to them, so an object's identity cannot be recycled while it is cached.

    The closed form folds each segment's normal-form pairs into the basis: ``W_seg = U·P_seg``
    (``D × 2m``), so a token needs one projection ``xᵀ[W_txt | W_img | U]`` for both its rotation
    coordinates and its risk, and one back-projection ``Δd·[W_txt | W_img]ᵀ``.
    """

    def __init__(self, block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> None:
        self.sources = _sources(block)
        self.versions = _versions(self.sources)
        self.device, self.dtype = device, dtype
        self.heads = block.heads.to(device)
        n = block.heads.numel()
        self.max_head = int(block.heads.max())
        self.is_arange = bool((block.heads == torch.arange(n)).all())
        self.U = {"q": block.U_q.detach().to(device, dtype), "k": block.U_k.detach().to(device, dtype)}
        self._folded: dict | None = None

    def valid_for(self, block: BlockAdapter) -> bool:
        now = _sources(block)
        return all(a is b for a, b in zip(now, self.sources)) and _versions(now) == self.versions

    def folded(self, block: BlockAdapter) -> dict:
        """``proj[which]: (n, D, K)`` = ``[W_txt | W_img | U | 0-pad]`` (K even), ``back[which]: (n, 2M, D)``,
        ``cols[seg] = (start, m)`` of the segment's pairs, ``theta[seg]: (n, m)``, ``r0`` = first column of U."""
        if self._folded is None:
            r = block.rank
            cols, theta, pieces, start = {}, {}, {"q": [], "k": []}, 0
            for seg in SEGMENTS:
                A = block.generator(seg)
                if A is None or r < 2:
                    continue
                P, th = normal_form(A)  # (n, r, 2m), (n, m) float64
                m = th.shape[-1]
                cols[seg], theta[seg] = (start, m), th.to(self.device, self.dtype)
                for w, U in (("q", block.U_q), ("k", block.U_k)):
                    pieces[w].append(U.detach().double() @ P)  # (n, D, 2m)
                start += 2 * m
            proj, back = {}, {}
            for w, U in (("q", block.U_q), ("k", block.U_k)):
                Ud = U.detach().double()
                pad = Ud.new_zeros(*Ud.shape[:-1], (start + r) % 2)  # keep K even: complex views need it
                W = torch.cat(pieces[w], dim=-1) if pieces[w] else Ud[..., :0]  # (n, D, 2M)
                proj[w] = torch.cat([W, Ud, pad], dim=-1).to(self.device, self.dtype).contiguous()
                back[w] = W.transpose(-1, -2).to(self.device, self.dtype).contiguous()  # (n, 2M, D)
            self._folded = {"proj": proj, "back": back, "cols": cols, "theta": theta, "r0": start}
        return self._folded


def _sources(block: BlockAdapter) -> tuple:
    return (block.heads, block.U_q, block.U_k, block.A_txt, block.A_img)


def _versions(sources: tuple) -> tuple:
    # Inference-mode tensors (ComfyUI runs nodes under torch.inference_mode()) have no version
    # counter; they cannot be modified in place outside inference mode, so identity suffices.
    return tuple(None if t is None else (-1 if t.is_inference() else t._version) for t in sources)


def _runtime(block: BlockAdapter, device: torch.device, dtype: torch.dtype) -> _Runtime:
    key = (str(device), dtype)
    rt = block._runtime.get(key)
    if rt is None or not rt.valid_for(block):
        rt = _Runtime(block, device, dtype)
        block._runtime[key] = rt
    return rt


def _check(q: Tensor, k: Tensor, block: BlockAdapter, txt_len: int, strength: float, threshold: float) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, L, D) of equal shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise TypeError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    L, D = q.shape[2], q.shape[3]
    if D != block.head_dim:
        raise ValueError(f"block {block.key}: head dim of q/k is {D}, adapter has {block.head_dim}")
    if not (isinstance(txt_len, int) and 0 <= txt_len <= L):
        raise ValueError(f"txt_len must be an int in [0, {L}], got {txt_len!r}")
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(f"strength must be finite and ≥ 0, got {strength!r}")
    if not (0.0 <= threshold < 1.0):
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")


def saferope_qk(q: Tensor, k: Tensor, block: BlockAdapter, *, txt_len: int, strength: float = 1.0,
                threshold: float, return_risk: bool = False, inplace: bool = False):
    """Apply SafeRoPE to the queries and keys of one block.

    Args:
        q, k: ``(B, H, L, D)`` post-QK-norm, pre-RoPE, text tokens first (``[0, txt_len)``),
            then image tokens (``[txt_len, L)``, reference-image tokens included). Any float dtype;
            the transform runs in float32 (float64 stays float64) and is cast back.
        block: the adapter's parameters for this block.
        txt_len: number of leading text tokens (``L`` for a text-only tensor, 0 for image-only).
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
    _check(q, k, block, txt_len, strength, threshold)
    L = q.shape[2]
    bounds = {"txt": (0, txt_len), "img": (txt_len, L)}
    active = tuple(s for s in SEGMENTS if block.generator(s) is not None and bounds[s][1] > bounds[s][0])
    if not return_risk and (strength == 0.0 or not active):
        return q, k

    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rt = _runtime(block, q.device, cdtype)
    if rt.max_head >= q.shape[1]:
        raise ValueError(f"block {block.key}: adapter selects head {rt.max_head}, q/k have {q.shape[1]} heads")
    all_heads = rt.is_arange and rt.heads.numel() == q.shape[1]  # no gather/scatter needed
    train = torch.is_grad_enabled() and any(block.generator(s).requires_grad for s in active)
    inplace = (inplace and not train and q is not k
               and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))
    outs, risks = [], []
    for x, which in ((q, "q"), (k, "k")):
        xs = x if all_heads else x.index_select(1, rt.heads)  # (B,H,L,D) -> (B,n,L,D)
        xc = xs.to(cdtype)  # xs itself for float32 inputs
        if train:
            y, rho, gate = _series(xc, block, rt, which, bounds, active, strength, threshold)
        else:
            y, rho, gate = _closed(xc, block, rt, which, bounds, active, strength, threshold,
                                   full_risk=return_risk, inplace=inplace and xc is xs)
        risks.append((rho, gate))
        if y is None:  # nothing rotated
            outs.append(x)
            continue
        y = y.to(x.dtype)
        if all_heads:
            outs.append(y)
        else:
            outs.append(x.index_copy_(1, rt.heads, y) if inplace else x.index_copy(1, rt.heads, y))
    if not return_risk:
        return outs[0], outs[1]
    risk = BlockRisk(heads=rt.heads, txt_len=txt_len, rho_q=risks[0][0].float(), rho_k=risks[1][0].float(),
                     gated_q=risks[0][1], gated_k=risks[1][1])
    return outs[0], outs[1], risk


def _gate(rho: Tensor, bounds: dict, active: tuple, threshold: float) -> Tensor:
    """``ρ > τ`` inside segments that have a generator; false elsewhere."""
    gate = rho > threshold
    for seg in SEGMENTS:
        if seg not in active:
            a, b = bounds[seg]
            gate[..., a:b] = False
    return gate


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


def _closed(xf: Tensor, block: BlockAdapter, rt: _Runtime, which: str, bounds: dict, active: tuple,
            strength: float, threshold: float, full_risk: bool = False, inplace: bool = False):
    """Inference path: closed-form rotations from the folded normal form (no per-token r×r matrix).

    Works on the token span of the active segments only; returns ``(x' or None, ρ, gate)``, ρ and
    gate over that span, or over every token with ``full_risk`` (the risk map; same ``x'``).
    """
    f = rt.folded(block)
    r0, r = f["r0"], block.rank
    L = xf.shape[2]
    lo, hi = _active_span(bounds, active)
    xs = xf[:, :, lo:hi]  # (B,n,L,D) -> (B,n,Ls,D) view
    rel = {seg: (min(max(a - lo, 0), hi - lo), min(max(b - lo, 0), hi - lo)) for seg, (a, b) in bounds.items()}
    y = torch.matmul(xs, f["proj"][which])  # (B,n,Ls,D) @ (n,D,K) -> (B,n,Ls,K): [d_txt | d_img | c | pad]
    rho = _rho(y[..., r0:r0 + r], xs)  # (B,n,Ls)
    gate = rho > threshold  # every token of the span is in an active segment
    if full_risk and (lo, hi) != (0, L):  # the risk map covers every token; nothing outside the span is gated
        rho_all = torch.cat([latent_risk(xf[:, :, :lo], rt.U[which])[0], rho,
                             latent_risk(xf[:, :, hi:], rt.U[which])[0]], dim=2)  # (B,n,L)
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
        dx = torch.bmm(dd.unsqueeze(1), f["back"][which][idx[1]]).squeeze(1)  # (G,1,2M) @ (G,2M,D) -> (G,D)
        span = out[:, :, lo:hi]  # a view: assigning through it writes into out
        span[idx] = xs[idx] + dx  # the right side is gathered before the write
        return out, ret_rho, ret_gate
    seg_of = {seg: _span_mask(*rel[seg], like=s) for seg in f["cols"]}  # (Ls,) each
    dd = _pair_deltas(y, s, f, seg_of, None)  # (B,n,Ls,2M)
    dx = torch.matmul(dd, f["back"][which])  # (B,n,Ls,2M) @ (n,2M,D) -> (B,n,Ls,D)
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


def _series(xf: Tensor, block: BlockAdapter, rt: _Runtime, which: str, bounds: dict, active: tuple,
            strength: float, threshold: float):
    """Training path: differentiable in the generators (scaled Taylor series on the coefficients)."""
    U = rt.U[which]
    rho, c = latent_risk(xf, U)  # (B,n,L), (B,n,L,r)
    gate = _gate(rho, bounds, active, threshold)
    if _nothing_to_do(xf, gate, strength):
        return None, rho, gate
    s = torch.where(gate, strength * rho, torch.zeros_like(rho))
    parts = []
    for seg in SEGMENTS:
        a, b = bounds[seg]
        if b <= a:
            continue
        if seg not in active:
            parts.append(torch.zeros_like(c[..., a:b, :]))
        else:
            A = block.generator(seg).to(xf.device, xf.dtype)
            parts.append(expm_apply_series(c[..., a:b, :], A, s[..., a:b]) - c[..., a:b, :])
    dc = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B,n,L,r)
    dx = torch.matmul(dc, U.transpose(-1, -2))  # (B,n,L,r) @ (n,r,D) -> (B,n,L,D)
    return torch.where(gate.unsqueeze(-1), xf + dx, xf), rho, gate

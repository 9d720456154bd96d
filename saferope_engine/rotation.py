"""Rotations ``exp(s·A)`` of skew-symmetric generators, applied to batches of small vectors.

A real skew-symmetric ``A`` (``A = -Aᵀ``, size ``r×r``) has the real normal form

    A = Σ_j θ_j (q_j p_jᵀ − p_j q_jᵀ),      θ_j ≥ 0,  {p_j, q_j} orthonormal,

i.e. in the basis ``(p_j, q_j)`` it acts as ``θ_j·J`` with ``J = [[0, −1], [1, 0]]`` and as 0 on
the rest. Hence, for any scalar ``s``,

    exp(s·A) c − c = Σ_j [p_j q_j] (R(s·θ_j) − I) [p_j q_j]ᵀ c,      R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]].

With the pairs precomputed once per generator, rotating a token costs ``2m`` dot products,
``m`` cos/sin pairs and a back-projection (``m = ⌊r/2⌋``), and no per-token ``r×r`` matrix is
ever formed. :func:`normal_form` computes the pairs; :mod:`saferope_engine.core` folds them into
the basis and applies them as complex rotations ``(a + ib)·e^{iφ}``.

The closed form is not differentiable with respect to ``A`` at degenerate spectra (``A = 0``
at initialisation, for instance), so training uses :func:`expm_apply_series`: a Taylor series
with scaling, applied to the vectors directly, exact to ~1e-10 and differentiable everywhere.
:func:`reference_rotate` is the slow per-token ``torch.matrix_exp`` formulation, kept for tests
and benchmarks only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import SafeRoPEError

__all__ = ["normal_form", "expm_apply_series", "reference_rotate", "skew_error", "MAX_SERIES_SCALE"]

#: Largest ``|s|·‖A‖`` the series accepts: 4 (the largest strength the nodes offer) times the
#: adapter format's generator bound (``adapter.MAX_GENERATOR_NORM`` = 256). The series takes
#: ``2·|s|·‖A‖`` squaring steps, so this bounds its work; beyond it the generator has diverged
#: (a too-large learning rate, a damaged checkpoint) and going on would only loop for a long time.
MAX_SERIES_SCALE = 1024.0


def skew_error(A: Tensor) -> Tensor:
    """Per-matrix ``‖A + Aᵀ‖_F`` of a ``(..., r, r)`` stack."""
    return torch.linalg.matrix_norm(A + A.transpose(-1, -2))


def normal_form(A: Tensor) -> tuple[Tensor, Tensor]:
    """Real normal form of a stack of skew-symmetric matrices.

    Args:
        A: ``(..., r, r)`` skew-symmetric.

    Returns:
        ``(P, theta)`` in float64 with ``P: (..., r, 2m)`` holding ``p_j`` in column ``2j`` and
        ``q_j`` in column ``2j+1``, and ``theta: (..., m)`` the non-negative angles, ``m = r // 2``.
        Pairs with a (numerically) zero angle get ``theta = 0`` and zero columns, so they
        contribute exactly nothing.
    """
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"expected square matrices, got shape {tuple(A.shape)}")
    r = A.shape[-1]
    m = r // 2
    A64 = A.detach().to(torch.float64)
    if m == 0:
        return A64.new_zeros(*A.shape[:-2], r, 0), A64.new_zeros(*A.shape[:-2], 0)
    # i·A is Hermitian; its eigenvalues are ±θ_j (and 0s). For λ > 0 with eigenvector v = a + i·b,
    # A·a = λ·b and A·b = −λ·a, and a ⟂ b with ‖a‖ = ‖b‖ = 1/√2 (v ⟂ v̄). So p = √2·a, q = √2·b.
    lam, vec = torch.linalg.eigh(1j * A64.to(torch.complex128))  # ascending: (..., r), (..., r, r)
    lam, vec = lam[..., r - m :], vec[..., :, r - m :]  # the m largest (non-negative) ones
    tol = 1e-9 * torch.linalg.matrix_norm(A64).clamp_min(1.0)  # (...,)
    keep = lam > tol.unsqueeze(-1)  # (..., m)
    p = math.sqrt(2.0) * vec.real * keep.unsqueeze(-2)  # (..., r, m)
    q = math.sqrt(2.0) * vec.imag * keep.unsqueeze(-2)  # (..., r, m)
    P = torch.stack((p, q), dim=-1).flatten(-2)  # (..., r, m, 2) -> (..., r, 2m)
    theta = torch.where(keep, lam, torch.zeros_like(lam))  # (..., m)
    return P, theta


def expm_apply_series(c: Tensor, A: Tensor, s: Tensor, *, terms: int = 12) -> Tensor:
    """``exp(s·A) c`` by a scaled Taylor series on the vectors; differentiable in ``A``, ``c``, ``s``.

    ``exp(sA) = exp(sA/N)^N`` with ``N`` chosen so that ``‖sA/N‖ ≤ 1/2``; each factor is a
    ``terms``-term Taylor polynomial (truncation error below 1e-12 per factor).

    Args:
        c: ``(B, n, L, r)``.
        A: ``(n, r, r)`` generators (any real matrices; skew ones give rotations).
        s: ``(B, n, L)`` per-token scale.
    """
    with torch.no_grad():
        bound = float(s.abs().amax()) * float(torch.linalg.matrix_norm(A).amax()) if c.numel() else 0.0
    if not bound <= MAX_SERIES_SCALE:  # also catches NaN and inf
        raise SafeRoPEError(f"rotation generator too large: |s|·‖A‖ = {bound:.3g} exceeds {MAX_SERIES_SCALE:g} "
                            "(a diverged training step or a damaged generator; lower the learning rate)")
    steps = max(1, math.ceil(2.0 * bound))
    h = (s / steps).unsqueeze(-1)  # (B,n,L,1)
    At = A.transpose(-1, -2)  # row-vector convention: (A c)ᵀ = cᵀ Aᵀ
    y = c
    for _ in range(steps):
        term, acc = y, y
        for k in range(1, terms + 1):
            term = torch.matmul(term, At) * (h / k)  # (B,n,L,r) @ (n,r,r)
            acc = acc + term
        y = acc
    return y


def reference_rotate(x: Tensor, U: Tensor, A: Tensor, s: Tensor) -> Tensor:
    """Slow reference: ``x + U (exp(s·A) − I) Uᵀ x`` with one ``torch.matrix_exp`` per token.

    Args:
        x: ``(B, n, L, D)``; U: ``(n, D, r)``; A: ``(n, r, r)``; s: ``(B, n, L)``.
    Materialises ``B·n·L·r·r`` (that is the point of it being a reference).
    """
    c = torch.matmul(x, U)  # (B,n,L,D) @ (n,D,r) -> (B,n,L,r)
    E = torch.matrix_exp(s[..., None, None] * A[:, None])  # (B,n,L,1,1) * (n,1,r,r) -> (B,n,L,r,r)
    c_rot = torch.matmul(E, c.unsqueeze(-1)).squeeze(-1)  # (B,n,L,r)
    return x + torch.matmul(c_rot - c, U.transpose(-1, -2))  # (B,n,L,r) @ (n,r,D)

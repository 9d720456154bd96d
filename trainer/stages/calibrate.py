"""Risk threshold calibration and the build's self-check, on held-out prompts.

``train.threshold = nan`` (the default) lets ``build``/``train`` choose τ from the data instead of a
constant. A seeded share of the unsafe and safe prompts (``calibrate.holdout``) is kept out of
``collect`` and ``train``; with the selected heads and bases (identity generators) the frozen model
runs those prompts along a short sampling trajectory (the ``collect.sigmas``) and records, for
every prompt and every patched site (block, head, q|k), the largest Latent Risk Score of a token
in a segment with a generator. τ is then the ``1 − calibrate.safe_share`` quantile of the held-out
safe prompts' largest risk plus ``calibrate.margin``: the lowest threshold that leaves (almost)
every safe prompt ungated. What was chosen, how, and the figures go into the adapter's metadata
(``config.calibration``) and ``metrics.json``; a threshold given by the user (or a recipe) wins and
is recorded as such.

The self-check runs the *trained* adapter on the same held-out prompts and measures the share of
unsafe prompts with a gated token and the share of safe prompts with one. When the adapter would
gate (almost) none of the concept (unsafe share below ``calibrate.min_unsafe``) the build fails
with those figures and what to change — it never leaves a silent no-op file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saferope_engine import SafeRoPEAdapter
from saferope_engine.core import segment_bounds

from ..core.errors import TrainerError

logger = logging.getLogger(__name__)

#: Largest threshold calibration may choose (the engine needs τ < 1).
MAX_TAU = 0.995


def split_holdout(n: int, share: float, seed: int, min_prompts: int) -> tuple[list[int], list[int]]:
    """``(fit, held)`` indices of ``n`` prompts: a seeded share held out (none when ``n < min_prompts``
    or ``share == 0``); both keep the file's order. At least one prompt is always fitted."""
    if share <= 0 or n < max(min_prompts, 2):
        return list(range(n)), []
    k = min(n - 1, max(1, round(share * n)))
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + n)
    held = sorted(torch.randperm(n, generator=g)[:k].tolist())
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


@dataclass
class RiskProfile:
    """Largest risk per prompt and patched site: ``values`` ``(N, S)``; ``gated`` ``(N,)`` bool, whether
    any token of the prompt was gated by the adapter's own τ (``None`` when not recorded)."""

    values: Tensor
    sites: list[str]
    gated: Tensor | None = None

    def prompt_max(self) -> Tensor:
        return self.values.max(dim=1).values if self.values.numel() else torch.zeros(self.values.shape[0])


def _active_mask(block, L: int, txt_len: int, img_first: bool) -> Tensor:
    mask = torch.zeros(L, dtype=torch.bool)
    for seg, (a, b) in segment_bounds(L, txt_len, img_first).items():
        if block.generator(seg) is not None:
            mask[a:b] = True
    return mask


class RiskRecorder:
    """An ``observe_qk`` observer: per batch row and site, the largest risk of an active token (``values``)
    and whether any token was gated by the adapter's τ (``gated`` ``(B,)``, over every site of the call)."""

    def __init__(self, adapter: SafeRoPEAdapter) -> None:
        self.adapter = adapter
        self.values: dict[str, Tensor] = {}
        self.gated: Tensor | None = None

    def __call__(self, kind: str, index: int, which: str, x, txt_len: int, img_first: bool) -> None:
        block = self.adapter.blocks.get((kind, index))
        if block is None:
            return
        _, risk = self.adapter.apply(kind, index, which, x, txt_len=txt_len, img_first=img_first, strength=0.0,
                                     return_risk=True)
        if risk is None:
            return
        rho, gate = risk  # (B, n, L)
        mask = _active_mask(block, rho.shape[-1], txt_len, img_first).to(rho.device)
        m = torch.where(mask, rho.float(), torch.zeros_like(rho, dtype=torch.float32)).amax(-1).cpu()  # (B, n)
        key = f"{kind}.{index}.{which}"
        self.values[key] = m if key not in self.values else torch.maximum(self.values[key], m)
        g = gate.flatten(1).any(1).cpu()
        self.gated = g if self.gated is None else self.gated | g


@torch.no_grad()
def risk_profile(caller, transformer, adapter: SafeRoPEAdapter, batches: Sequence, sigmas: Sequence[float], seed: int,
                 *, apply: bool) -> RiskProfile:
    """Run ``batches`` (:class:`~trainer.families.text.TextBatch`) along a trajectory through ``sigmas``
    (Euler steps of the model, from seeded noise) and record every site's largest risk per prompt.

    ``apply``: the adapter is applied (its rotation changes later blocks' inputs) — the self-check;
    otherwise the bare model runs — calibration (the risk of the frozen model's tokens).
    """
    from saferope_engine.diffusers import apply_saferope, observe_qk

    sig = sorted({float(s) for s in sigmas}, reverse=True)
    rows, gated, sites = [], [], None
    for bi, text in enumerate(batches):
        rec = RiskRecorder(adapter)
        handle = apply_saferope(transformer, adapter, strength=1.0) if apply else None
        obs = observe_qk(transformer, rec)
        try:
            g = torch.Generator().manual_seed(seed * 7919 + bi)
            x = caller.noise(len(text), g)
            for i, s in enumerate(sig):
                v = caller.velocity(x, torch.full((len(text),), s), text)
                nxt = sig[i + 1] if i + 1 < len(sig) else 0.0
                x = x + (nxt - s) * v.to(x.dtype)
        finally:
            obs.remove()
            if handle is not None:
                handle.remove()
        if not rec.values:
            raise TrainerError("calibration: no patched block ran (the adapter does not fit this transformer)")
        sites = sites or sorted(rec.values)
        rows.append(torch.cat([rec.values[k] for k in sites], dim=1))
        gated.append(rec.gated if rec.gated is not None else torch.zeros(len(text), dtype=torch.bool))
    values = torch.cat(rows) if rows else torch.zeros(0, 0)
    return RiskProfile(values, sites or [], torch.cat(gated) if gated else None)


def choose_threshold(unsafe: RiskProfile, safe: RiskProfile, *, safe_share: float, margin: float) -> dict[str, Any]:
    """τ = the ``1 − safe_share`` quantile of the safe prompts' largest risk + ``margin`` (at most
    :data:`MAX_TAU`), with the figures that describe it."""
    s_max = safe.prompt_max()
    if s_max.numel() == 0 or unsafe.values.shape[0] == 0:
        raise TrainerError("calibration needs at least one held-out unsafe and one safe prompt")
    # "higher": a value of the data at or above the quantile, so at most safe_share of the prompts exceed it
    q = float(torch.quantile(s_max.double(), 1.0 - safe_share, interpolation="higher")) if safe_share > 0 \
        else float(s_max.max())
    tau = min(MAX_TAU, q + margin)
    return {"method": "calibrated", "threshold": round(tau, 4), "safe_quantile": 1.0 - safe_share,
            "safe_risk_at_quantile": round(q, 4), "margin": margin, **separation(unsafe, safe, tau)}


def separation(unsafe: RiskProfile, safe: RiskProfile, tau: float) -> dict[str, Any]:
    """How ``tau`` splits the two profiles (from the recorded risks)."""
    u_max, s_max = unsafe.prompt_max(), safe.prompt_max()

    def q(t: Tensor, p: float) -> float:
        return round(float(torch.quantile(t.double(), p)), 4) if t.numel() else float("nan")

    return {"unsafe_prompts": int(u_max.numel()), "safe_prompts": int(s_max.numel()),
            "unsafe_gated_share": round(float((u_max > tau).double().mean()), 4),
            "unsafe_site_share": round(float((unsafe.values > tau).double().mean()), 4),
            "safe_gated_share": round(float((s_max > tau).double().mean()), 4),
            "unsafe_max_risk": {"min": q(u_max, 0.0), "median": q(u_max, 0.5), "max": q(u_max, 1.0)},
            "safe_max_risk": {"min": q(s_max, 0.0), "median": q(s_max, 0.5), "max": q(s_max, 1.0)}}


def self_check(unsafe: RiskProfile, safe: RiskProfile, *, tau: float, method: str, min_unsafe: float,
               held_out: bool = True) -> dict[str, Any]:
    """Figures of the trained adapter on the held-out prompts. When the unsafe share with a gated token
    is below ``min_unsafe`` the report has ``passed: False`` and ``error``: the one-line message (the
    figures and what to change) that :func:`raise_failed` raises."""
    u = float(unsafe.gated.double().mean()) if unsafe.gated is not None and unsafe.gated.numel() else 0.0
    s = float(safe.gated.double().mean()) if safe.gated is not None and safe.gated.numel() else 0.0
    u_max, s_max = unsafe.prompt_max(), safe.prompt_max()
    report = {"threshold": tau, "threshold_method": method, "unsafe_gated_share": round(u, 4),
              "safe_gated_share": round(s, 4), "unsafe_prompts": int(u_max.numel()), "safe_prompts": int(s_max.numel()),
              "min_unsafe": min_unsafe, "passed": u >= min_unsafe}
    if u < min_unsafe:
        top = float(u_max.max()) if u_max.numel() else float("nan")
        med = float(u_max.median()) if u_max.numel() else float("nan")
        smax = float(s_max.max()) if s_max.numel() else float("nan")
        if method == "calibrated":
            fix = ("the selected heads do not separate the concept from the safe prompts at this rank: raise "
                   "select.rank or select.count, give more (and more distinct) unsafe prompts, or allow some safe "
                   "prompts to gate (calibrate.safe_share)")
        else:
            fix = (f"lower train.threshold (held-out unsafe prompts reach risk {med:.3g} median, {top:.3g} at most; "
                   f"safe ones {smax:.3g}) or leave it unset (nan) so that build calibrates it")
        which = "held-out" if held_out else "(too few to hold some out: training)"
        report["error"] = (
            f"self-check failed: the adapter gates {100 * u:.0f}% of {u_max.numel()} {which} unsafe prompts "
            f"(needs ≥ {100 * min_unsafe:.0f}%, calibrate.min_unsafe) and {100 * s:.0f}% of {s_max.numel()} safe ones "
            f"at τ = {tau:.3g} ({method}); it would do (almost) nothing. Fix: {fix}")
    return report


def raise_failed(report: dict[str, Any]) -> None:
    """Raise the self-check's :class:`TrainerError` when it did not pass."""
    if not report.get("passed", True):
        raise TrainerError(report["error"])


def finite(d: Any) -> Any:
    """NaN → None for JSON metadata."""
    if isinstance(d, float) and not math.isfinite(d):
        return None
    if isinstance(d, dict):
        return {k: finite(v) for k, v in d.items()}
    return d

"""Collect the Latent Risk Scores of one model call and reduce them for people to read.

The LRS visualizer runs one model evaluation with a :class:`RiskCollector` installed
(:func:`.patch.collect_risk`); every hook site hands it the engine's :class:`BlockRisk`.
:meth:`RiskCollector.report` reduces them to one :class:`Column` per (layer, patched block):

* text risk per token — max over batch rows, selected heads and q/k of the LRS,
* whether each text token was gated anywhere in the block (gated = actually rotated: a layer
  outside its sampling range, or at strength 0, gates nothing),
* the gated share per image token — the fraction of (row, head, q|k) entries gated,
* the gated share of the block's text and image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..saferope_engine.core import BlockRisk
from .layer import SafeRoPELayer


@dataclass
class Column:
    """Risk of one patched block of one layer, reduced over batch rows and heads."""

    layer: SafeRoPELayer
    kind: str
    index: int
    label: str
    txt_rho: Tensor  # (T,) float32 max LRS per text token
    txt_gated: Tensor  # (T,) bool
    img_share: Tensor  # (N,) float32 gated share per image token
    txt_gated_share: float
    img_gated_share: float


@dataclass
class RiskReport:
    """All columns of one model call; ``txt_len`` text tokens, ``img_len`` image tokens."""

    columns: list[Column]
    txt_len: int
    img_len: int

    def image_share(self) -> Tensor:
        """``(N,)`` mean gated share of every image token over all columns."""
        if not self.columns or self.img_len == 0:
            return torch.zeros(self.img_len)
        return torch.stack([c.img_share for c in self.columns]).mean(0)

    def token_max(self) -> Tensor:
        """``(T,)`` max text risk of each token over all columns."""
        if not self.columns:
            return torch.zeros(self.txt_len)
        return torch.stack([c.txt_rho for c in self.columns]).amax(0)


def _joint(parts: dict[str, BlockRisk]) -> tuple[Tensor, Tensor, int]:
    """Merge the parts of one block into ``(rho (2, B, n, L), gated (2, B, n, L), txt_len)``."""
    if "joint" in parts:
        r = parts["joint"]
        return torch.stack([r.rho_q, r.rho_k]), torch.stack([r.gated_q, r.gated_k]), r.txt_len
    seq = [parts[p] for p in ("txt", "img") if p in parts]  # text stream first, as in attention
    rho = torch.stack([torch.cat([r.rho_q for r in seq], -1), torch.cat([r.rho_k for r in seq], -1)])  # (2,B,n,L)
    gated = torch.stack([torch.cat([r.gated_q for r in seq], -1), torch.cat([r.gated_k for r in seq], -1)])
    txt = parts["txt"].rho_q.shape[-1] if "txt" in parts else 0
    return rho, gated, txt


def _share(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else 0.0


class RiskCollector:
    """A :class:`~.patch.RiskSink` that keeps the risks of the first model call it sees."""

    def __init__(self) -> None:
        self.closed = False
        self._parts: dict[tuple[str, str, int], dict[str, BlockRisk]] = {}

    def add(self, layer: SafeRoPELayer, kind: str, index: int, part: str, risk: BlockRisk, *, rotated: bool) -> None:
        if self.closed:
            return
        if not rotated:  # scores only: nothing was rotated, so nothing counts as gated
            risk = BlockRisk(risk.heads, risk.txt_len, risk.rho_q, risk.rho_k,
                             torch.zeros_like(risk.gated_q), torch.zeros_like(risk.gated_k))
        self._parts.setdefault((layer.token, kind, index), {})[part] = risk

    def close(self) -> None:
        self.closed = True

    def report(self, layers: list[SafeRoPELayer]) -> RiskReport:
        """Columns in layer order, then block order (double before single)."""
        multi = len(layers) > 1
        cols, txt_len, img_len = [], 0, 0
        for n, layer in enumerate(layers):
            for kind, idx in layer.adapter.block_keys():
                parts = self._parts.get((layer.token, kind, idx))
                if not parts:
                    continue
                rho, gated, t = _joint(parts)
                per_tok = rho.amax(dim=(0, 1, 2))  # (2,B,n,L) -> (L,)
                share = gated.float().mean(dim=(0, 1, 2))  # (L,)
                txt_len, img_len = t, per_tok.shape[0] - t
                label = f"{kind[0]}{idx}" if not multi else f"{chr(65 + n % 26)}:{kind[0]}{idx}"
                cols.append(Column(layer, kind, idx, label, per_tok[:t].float(), gated[..., :t].any(dim=(0, 1, 2)),
                                   share[t:].float(), _share(gated[..., :t]), _share(gated[..., t:])))
        return RiskReport(cols, txt_len, img_len)

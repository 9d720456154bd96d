"""Collect the Latent Risk Scores of one model call and reduce them for people to read.

The LRS visualizer runs one model evaluation with a :class:`RiskCollector` installed
(:func:`.patch.collect_risk`); every hook site hands it the scores of its queries or keys.
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

from .layer import SafeRoPELayer


@dataclass
class Column:
    """Risk of one patched block of one layer, reduced over batch rows and heads."""

    layer: SafeRoPELayer
    kind: str
    index: int
    label: str
    txt_rho: Tensor  # (T,) float32 max LRS per text token (NaN: the block sees no text)
    txt_gated: Tensor  # (T,) bool
    img_share: Tensor  # (N,) float32 gated share per image token
    txt_gated_share: float
    img_gated_share: float
    max_risk: float = 0.0  # max LRS over every token (text and image), head and q/k of the block
    passed: bool = False  # some token's LRS exceeded the threshold where the adapter rotates (active or not)


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

    def max_risk(self) -> float:
        """Max LRS over every token, head, q/k and patched block (0 when nothing was recorded)."""
        return max((c.max_risk for c in self.columns), default=0.0)

    def flagged(self) -> bool:
        """Whether some token passed a layer's threshold in a segment it rotates (the prompt is risky)."""
        return any(c.passed for c in self.columns)

    def token_max(self) -> Tensor:
        """``(T,)`` max text risk of each token over all columns (columns without text count 0)."""
        if not self.columns:
            return torch.zeros(self.txt_len)
        return torch.stack([c.txt_rho.nan_to_num(0.0) for c in self.columns]).amax(0)


def _reduce(entries: dict[str, tuple[Tensor, Tensor, int, bool]]) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """q and k of one stream -> per-token ``(rho_max (L,), gated_any (L,), gated_share (L,), txt_len, img_first)``."""
    rhos, gates, shares = [], [], []
    txt_len, img_first = 0, False
    for rho, gate, t, flip in entries.values():  # (B, n, L) each; n differs for q and k under GQA
        rhos.append(rho.float().amax(dim=(0, 1)))
        gates.append(gate.any(dim=1).any(dim=0))
        shares.append(gate.float().mean(dim=(0, 1)))
        txt_len, img_first = t, flip
    return (torch.stack(rhos).amax(0), torch.stack(gates).any(0), torch.stack(shares).mean(0), txt_len, img_first)


def _split(streams: dict[str, dict]) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """One block's streams -> (text part, image part), each ``(rho (T,), gated (T,), share (T,))``."""
    parts: dict[str, list] = {"txt": [], "img": []}
    for stream, entries in streams.items():
        rho, gated, share, t, img_first = _reduce(entries)
        if stream == "joint":
            a = rho.shape[0] - t if img_first else 0  # where the text tokens start
            txt, img = slice(a, a + t), (slice(0, a) if img_first else slice(t, None))
            parts["txt"].append((rho[txt], gated[txt], share[txt]))
            parts["img"].append((rho[img], gated[img], share[img]))
        else:
            parts[stream].append((rho, gated, share))
    out = []
    for seg in ("txt", "img"):
        seq = parts[seg]
        if not seq:
            out.append((torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0)))
        else:  # a block sees each token once: one entry per segment
            out.append(seq[0])
    return out[0], out[1]


def _pad(x: Tensor, n: int, value: float | bool) -> Tensor:
    return torch.cat([x, torch.full((n - x.shape[0],), value, dtype=x.dtype)]) if x.shape[0] < n else x


def _share(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else 0.0


class RiskCollector:
    """A :class:`~.patch.RiskSink` that keeps the risks of the first model call it sees."""

    def __init__(self) -> None:
        self.closed = False
        self._passed: dict[tuple[str, str, int], bool] = {}
        self._max: dict[tuple[str, str, int], float] = {}
        # (layer token, kind, index) -> stream -> which -> (rho, gate, txt_len, img_first)
        self._parts: dict[tuple[str, str, int], dict[str, dict[str, tuple[Tensor, Tensor, int, bool]]]] = {}

    def add(self, layer: SafeRoPELayer, kind: str, index: int, stream: str, which: str, rho: Tensor, gate: Tensor,
            *, txt_len: int, rotated: bool, img_first: bool = False) -> None:
        if self.closed:
            return
        passed = bool(gate.any())  # the visualizer's one model call: a host read is fine here
        if not rotated:  # scores only: nothing was rotated, so nothing counts as gated
            gate = torch.zeros_like(gate)
        self._parts.setdefault((layer.token, kind, index), {}).setdefault(stream, {})[which] = (
            rho.detach().cpu(), gate.detach().cpu(), txt_len, img_first)
        self._passed[(layer.token, kind, index)] = self._passed.get((layer.token, kind, index), False) or passed
        key = (layer.token, kind, index)
        self._max[key] = max(self._max.get(key, 0.0), float(rho.detach().float().max()) if rho.numel() else 0.0)

    def close(self) -> None:
        self.closed = True

    def report(self, layers: list[SafeRoPELayer]) -> RiskReport:
        """Columns in layer order, then the adapter's block order (the family's kinds in model order).

        Columns of kinds without text (or image) tokens carry NaN risk (no share) there.
        """
        multi = len(layers) > 1
        raw = []
        for n, layer in enumerate(layers):
            for kind, idx in layer.adapter.block_keys():
                streams = self._parts.get((layer.token, kind, idx))
                if not streams:
                    continue
                (t_rho, t_gated, t_share), (_, _, i_share) = _split(streams)
                abbrev = "".join(w[0] for w in kind.split("_"))
                label = f"{abbrev}{idx}" if not multi else f"{chr(65 + n % 26)}:{abbrev}{idx}"
                key = (layer.token, kind, idx)
                raw.append((layer, kind, idx, label, t_rho, t_gated, i_share, _share(t_share), _share(i_share),
                            self._max.get(key, 0.0), self._passed.get(key, False)))
        txt_len = max((r[4].shape[0] for r in raw), default=0)
        img_len = max((r[6].shape[0] for r in raw), default=0)
        cols = [Column(layer, kind, idx, label, _pad(t_rho, txt_len, float("nan")), _pad(t_gated, txt_len, False),
                       _pad(i_share, img_len, 0.0), ts, im, mx, passed)
                for layer, kind, idx, label, t_rho, t_gated, i_share, ts, im, mx, passed in raw]
        return RiskReport(cols, txt_len, img_len)

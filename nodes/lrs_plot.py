"""Draw a :class:`~.risk.RiskReport` as one picture, with PIL only (ComfyUI ships Pillow).

Left: a heatmap of text tokens (rows, labelled) × patched blocks (columns) — the max LRS over
heads and q/k — with a colour bar that marks the threshold τ; tokens that were gated (ρ > τ where
the adapter rotates) are outlined. Right: where the image tokens were gated (share of heads,
q/k and blocks, on the token grid), and the gated share of text and image tokens per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .risk import RiskReport

MAX_ROWS = 64  # text tokens shown; the rest are summarised in the STRING output
_STOPS = ((0.0, (13, 8, 40)), (0.25, (84, 22, 110)), (0.5, (170, 50, 92)), (0.75, (240, 120, 30)), (1.0, (252, 240, 150)))
_BG, _FG, _DIM, _MARK = (250, 250, 248), (25, 25, 30), (110, 110, 120), (0, 200, 255)
_TXT_BAR, _IMG_BAR = (225, 110, 40), (60, 120, 200)


def colour(v: float) -> tuple[int, int, int]:
    """Map ``v`` in [0, 1] to a dark-to-bright RGB colour."""
    v = min(max(float(v), 0.0), 1.0)
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(round(x + (y - x) * t)) for x, y in zip(ca, cb))  # type: ignore[return-value]
    return _STOPS[-1][1]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow ≥ 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


@dataclass
class PlotInput:
    """What :func:`render` needs besides the report."""

    title: str
    subtitle: str
    labels: list[str]  # one per text token
    grid: tuple[int, int] | None  # (rows, cols) of the main image's tokens
    threshold: float


def select_rows(labels: list[str], token_max: torch.Tensor, limit: int = MAX_ROWS) -> list[int]:
    """Token indices to show: padding dropped first, then the highest-risk ones, in order."""
    idx = [i for i, s in enumerate(labels) if s != "<pad>"] or list(range(len(labels)))
    if len(idx) > limit:
        keep = sorted(idx, key=lambda i: -float(token_max[i]))[:limit]
        idx = sorted(keep)
    return idx


def render(report: RiskReport, p: PlotInput) -> Image.Image:
    """The picture, RGB."""
    f, fs, fb = _font(12), _font(10), _font(15)
    cols = report.columns
    rows = select_rows(p.labels, report.token_max()) if cols else []
    cell_h, label_w, bar_w = 14, 118, 170
    cell_w = max([26] + [int(fs.getlength(c.label)) + 8 for c in cols])
    heat_w = label_w + max(len(cols) * cell_w, bar_w + 16)
    right_w, m = 300, 14
    top = m + 44
    heat_h = 20 + len(rows) * cell_h + 58
    bars_h = 26 + len(cols) * 16
    right_h = 22 + 240 + 30 + bars_h
    W = m + heat_w + 2 * m + right_w + m
    H = top + max(heat_h, right_h, 120) + m
    img = Image.new("RGB", (W, H), _BG)
    d = ImageDraw.Draw(img)
    d.text((m, m), p.title, font=fb, fill=_FG)
    d.text((m, m + 22), p.subtitle, font=fs, fill=_DIM)
    if not cols:
        d.text((m, top + 10), "No risk scores were recorded: the model call did not reach a patched block.", font=f, fill=_FG)
        return img

    # -- heatmap: text tokens × blocks ----------------------------------------------------------
    x0, y0 = m + label_w, top + 20
    for j, c in enumerate(cols):
        d.text((x0 + j * cell_w + 3, top + 4), c.label, font=fs, fill=_FG)
    for r, i in enumerate(rows):
        y = y0 + r * cell_h
        label = p.labels[i] if i < len(p.labels) else f"#{i}"
        text = f"{i:>3} {label}"
        while fs.getlength(text) > label_w - 6 and len(text) > 4:
            text = text[:-2] + "…"
        d.text((m, y + 1), text, font=fs, fill=_FG)
        for j, c in enumerate(cols):
            x = x0 + j * cell_w
            v = float(c.txt_rho[i])
            fill = _BG if v != v else colour(v)  # NaN: this block sees no text tokens
            d.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=fill, outline=_DIM if v != v else None)
            if bool(c.txt_gated[i]):
                d.rectangle([x + 1, y + 1, x + cell_w - 2, y + cell_h - 2], outline=_MARK, width=2)
    # colour bar with the threshold marker
    by = y0 + len(rows) * cell_h + 12
    bw = max(bar_w, len(cols) * cell_w)
    for t in range(bw):
        d.line([x0 + t, by, x0 + t, by + 10], fill=colour(t / (bw - 1)))
    tx = x0 + int(round(p.threshold * (bw - 1)))
    d.line([tx, by - 4, tx, by + 14], fill=_MARK, width=2)
    d.text((x0 - 10, by + 14), "0", font=fs, fill=_DIM)
    d.text((x0 + bw - 8, by + 14), "1", font=fs, fill=_DIM)
    d.text((max(x0 + 8, tx - 36), by + 14), f"threshold {p.threshold:.2f}", font=fs, fill=_FG)
    d.text((m, by - 2), "LRS (max over", font=fs, fill=_DIM)
    d.text((m, by + 10), "heads, q/k)", font=fs, fill=_DIM)
    d.text((m, by + 32), "outlined = gated (LRS > threshold, rotated)", font=fs, fill=_DIM)

    # -- image-token map ------------------------------------------------------------------------
    rx = m + heat_w + 2 * m
    share = report.image_share()
    n_main = p.grid[0] * p.grid[1] if p.grid and p.grid[0] * p.grid[1] <= share.numel() else share.numel()
    gh, gw = p.grid if p.grid and p.grid[0] * p.grid[1] == n_main else (1, max(1, n_main))
    peak = float(share[:n_main].max()) if n_main else 0.0
    d.text((rx, top), "Image tokens gated (share of heads, q/k and blocks)", font=fs, fill=_FG)
    side = 240
    sc = max(1, min(side // max(gh, 1), side // max(gw, 1)))
    if n_main and peak > 0:
        grid = share[:n_main].reshape(gh, gw) / peak  # (N,) -> (gh, gw), 0..1 of the brightest token
        rgb = np.array([[colour(float(v)) for v in row] for row in grid], dtype=np.uint8)
        tile = Image.fromarray(rgb, "RGB").resize((gw * sc, gh * sc), Image.NEAREST)
        img.paste(tile, (rx, top + 18))
    elif n_main:  # nothing gated: a neutral field, not the colour of "zero risk data"
        d.rectangle([rx, top + 18, rx + gw * sc - 1, top + 18 + gh * sc - 1], fill=(225, 225, 228), outline=(200, 200, 205))
    note = f"colour scale 0 - {peak:.1%} (brightest)" if peak > 0 else "no image token was gated"
    if share.numel() > n_main:
        note += f"; +{share.numel() - n_main} reference tokens, {float(share[n_main:].mean()):.1%} gated"
    d.text((rx, top + 22 + gh * sc), note, font=fs, fill=_DIM)

    # -- per-block gated shares ------------------------------------------------------------------
    yb = top + 22 + gh * sc + 22
    d.text((rx, yb), "Gated share per block:", font=fs, fill=_FG)
    d.rectangle([rx + 150, yb + 2, rx + 158, yb + 10], fill=_TXT_BAR)
    d.text((rx + 162, yb), "text", font=fs, fill=_DIM)
    d.rectangle([rx + 200, yb + 2, rx + 208, yb + 10], fill=_IMG_BAR)
    d.text((rx + 212, yb), "image", font=fs, fill=_DIM)
    for j, c in enumerate(cols):
        y = yb + 18 + j * 16
        d.text((rx, y), c.label, font=fs, fill=_FG)
        for k, (v, fill) in enumerate(((c.txt_gated_share, _TXT_BAR), (c.img_gated_share, _IMG_BAR))):
            bx = rx + 48 + k * 126
            d.rectangle([bx, y + 2, bx + 80, y + 10], outline=(200, 200, 205))
            d.rectangle([bx, y + 2, bx + int(round(80 * v)), y + 10], fill=fill)
            d.text((bx + 84, y), f"{v:.1%}", font=fs, fill=_DIM)
    return img


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE ``(1, H, W, 3)`` float32 in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).unsqueeze(0)

"""Benign-preservation metrics and the results layout of ``trainer evaluate``.

* :func:`ssim` — structural similarity (Wang et al., 2004): 11×11 Gaussian window (σ = 1.5),
  K1 = 0.01, K2 = 0.03, L = 255, computed per RGB channel over the window positions that fit
  inside the image and averaged (``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, use_sample_covariance=False`` and its borders cropped).
* :class:`Results` — one row per (prompt, seed, variant) with the prompt's id and category, the
  variant (``base`` or the adapter's name), gating, PSNR/SSIM to the base image of the same
  seed and every per-image scorer value; written as ``results.csv`` and ``results.json``
  (:data:`SCHEMA`) for leaderboards, with a summary per category and variant and ``report.md``.

Row columns: ``prompt_id`` (``<recipe>/<category>/<index>``, the index of the prompt in its
file), ``category``, ``prompt``, ``seed``, ``variant``, ``unsafe`` (0/1 by the first scorer that
flags images, e.g. NudeNet; empty without one), ``gated`` and ``changed`` (0/1; empty for base),
``psnr`` (dB to the base image; empty when identical or for base), ``ssim`` (to the base image),
``clip_score`` (with ``--clip``), then the scorers' own columns (``nudenet.max_score``, …) and
``image`` (the PNG under ``OUT/evaluate/``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scorers import CLIP

SCHEMA = "saferope.evaluate/1"
FIXED_COLUMNS = ("prompt_id", "category", "prompt", "seed", "variant", "unsafe", "gated", "changed", "psnr", "ssim",
                 "clip_score")


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 images or stacks from their aggregate MSE (``inf`` when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, *, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two uint8 images ``(H, W)`` or ``(H, W, C)`` of the same shape, in [-1, 1] (1 = identical).

    Images smaller than the window use the largest odd window that fits.
    """
    import torch
    import torch.nn.functional as F

    if a.shape != b.shape:
        raise ValueError(f"SSIM of images of different shapes {a.shape} and {b.shape}")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    x, y = x.permute(2, 0, 1)[:, None], y.permute(2, 0, 1)[:, None]  # (H, W, C) -> (C, 1, H, W)
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    g = torch.from_numpy(_gaussian(size, sigma))
    kernel = (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)  # valid positions only

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


@dataclass
class Results:
    """Rows of one evaluation and their summary per (category, variant)."""

    recipe: str = ""  # recipe name, the prompt ids' prefix ("" without a recipe)
    rows: list[dict[str, Any]] = field(default_factory=list)
    unsafe_by: str | None = None  # the scorer whose per-image `unsafe` fills the `unsafe` column
    set_psnr: dict[tuple[str, str], float] = field(default_factory=dict)  # (category, variant) -> dB (inf: identical)

    def prompt_id(self, category: str, index: int) -> str:
        return f"{self.recipe}/{category}/{index:04d}" if self.recipe else f"{category}/{index:04d}"

    def add(self, category: str, variant: str, jobs: Sequence[tuple[int, Any, int]], arrays: Sequence[np.ndarray],
            base: Sequence[np.ndarray] | None, gated: Sequence[bool], scores: Sequence[Mapping[str, float]],
            images: Sequence[str | None]) -> dict[str, Any]:
        """Rows of one set and variant; ``jobs`` are ``(index, item, seed)``, ``base`` the base images.

        Returns the set-level preservation metrics (``psnr`` over the whole set, mean ``ssim``).
        """
        if self.unsafe_by is None:
            for s in scores:
                names = [k.rsplit(".", 1)[0] for k in s if k.endswith(".unsafe")]
                if names:
                    self.unsafe_by = names[0]
                    break
        ssims: list[float] = []
        for n, ((index, item, seed), arr) in enumerate(zip(jobs, arrays)):
            row: dict[str, Any] = {"prompt_id": self.prompt_id(category, index), "category": category,
                                   "prompt": item.prompt, "seed": int(seed), "variant": variant,
                                   "unsafe": None, "gated": None, "changed": None, "psnr": None, "ssim": None,
                                   "clip_score": None}
            sc = dict(scores[n]) if n < len(scores) else {}
            if self.unsafe_by and f"{self.unsafe_by}.unsafe" in sc:
                row["unsafe"] = int(sc[f"{self.unsafe_by}.unsafe"])
            if f"{CLIP}.score" in sc:
                row["clip_score"] = float(sc.pop(f"{CLIP}.score"))
            if base is not None:
                ref = base[n]
                changed = not np.array_equal(arr, ref)
                p = psnr_db(arr, ref)
                row.update(gated=int(bool(gated[n])), changed=int(changed), psnr=p if math.isfinite(p) else None,
                           ssim=ssim(arr, ref) if changed else 1.0)
                ssims.append(row["ssim"])
            row.update({k: v for k, v in sc.items()})
            row["image"] = images[n] if n < len(images) else None
            self.rows.append(row)
        if base is None:
            return {}
        self.set_psnr[(category, variant)] = psnr_db(np.stack(arrays), np.stack(base))
        return {"psnr": self.set_psnr[(category, variant)], "ssim": _mean(ssims)}

    # -- summary and files -------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """Per (category, variant), in first-seen order: images, unsafe rate (and its change from base),
        gated/changed shares, PSNR over the set's pixels, mean SSIM and CLIP score."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in self.rows:
            groups.setdefault((r["category"], r["variant"]), []).append(r)
        out = []
        base_rate: dict[str, float | None] = {}
        for (cat, var), rows in groups.items():
            rate = _mean([r["unsafe"] for r in rows])
            if var == "base":
                base_rate[cat] = rate
            entry: dict[str, Any] = {"category": cat, "variant": var, "images": len(rows), "unsafe_rate": rate,
                                     "unsafe_rate_vs_base": None, "gated": _mean([r["gated"] for r in rows]),
                                     "changed": _mean([r["changed"] for r in rows]), "psnr": None,
                                     "ssim": _mean([r["ssim"] for r in rows]),
                                     "clip_score": _mean([r["clip_score"] for r in rows])}
            if var != "base":
                p = self.set_psnr.get((cat, var), math.inf)  # PSNR of the set's mean squared error
                entry["psnr"] = p if math.isfinite(p) else None
                b = base_rate.get(cat)
                if rate is not None and b is not None:
                    entry["unsafe_rate_vs_base"] = rate - b
            out.append(entry)
        return out

    def columns(self) -> list[str]:
        extra = sorted({k for r in self.rows for k in r if k not in FIXED_COLUMNS and k != "image"})
        return list(FIXED_COLUMNS) + extra + ["image"]

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _csv_value(r.get(k)) for k in self.columns()})
        return buf.getvalue()

    def document(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The results.json content: schema, run description, summary and rows."""
        return {"schema": SCHEMA, **meta, "unsafe_by": self.unsafe_by, "columns": self.columns(),
                "summary": self.summary(), "rows": self.rows}

    def report(self, meta: Mapping[str, Any]) -> str:
        """A Markdown report: what was run, what "unsafe" means, one table row per category and variant."""
        lines = [f"# SafeRoPE evaluation{': recipe ' + self.recipe if self.recipe else ''}", "",
                 f"Model `{meta.get('model')}`, {meta.get('steps')} steps, {meta.get('size', ['?', '?'])[1]}×"
                 f"{meta.get('size', ['?', '?'])[0]} px, seeds {meta.get('seeds')}, strength {meta.get('strength')}; "
                 f"variants: " + ", ".join(f"`{k}`" + (f" ({v})" if v else "") for k, v in
                                             meta.get("variants", {}).items()) + ".", ""]
        scorers = meta.get("scorers", {})
        if self.unsafe_by and self.unsafe_by in scorers:
            d = scorers[self.unsafe_by]
            lines += [f"**Unsafe rate** = share of images flagged by {d.get('package', self.unsafe_by)} "
                      f"({d.get('detector', '')}): {d.get('unsafe', '')}; classes "
                      + ", ".join(f"`{c}`" for c in d.get("unsafe_classes", [])) + ".", ""]
        else:
            lines += ["No unsafe-rate scorer ran (the recipe has no shipped detector for its concept); gating and "
                      "preservation only.", ""]
        if CLIP in scorers:
            lines += [f"**CLIP score** = {scorers[CLIP].get('score')} ({scorers[CLIP].get('model')}).", ""]
        lines += ["**PSNR / SSIM** compare each image with the base model's image of the same prompt and seed "
                  "(PSNR over the set's pixels; identical sets show `identical`).", "",
                  "| category | variant | images | unsafe rate | vs base | gated | changed | PSNR (dB) | SSIM | CLIP score |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.summary():
            psnr_text = "-" if s["variant"] == "base" else ("identical" if s["psnr"] is None else f"{s['psnr']:.1f}")
            lines.append("| " + " | ".join([
                s["category"], s["variant"], str(s["images"]), _pct(s["unsafe_rate"]), _pct(s["unsafe_rate_vs_base"],
                                                                                             signed=True),
                _pct(s["gated"]), _pct(s["changed"]), psnr_text, _num(s["ssim"], 3), _num(s["clip_score"], 2)]) + " |")
        return "\n".join(lines) + "\n"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return repr(round(v, 6))
    return v


def _pct(v: float | None, *, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"

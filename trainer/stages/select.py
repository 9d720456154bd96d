"""``select``: unsafe bases, head discrimination scores and the chosen heads (design §3.2-3.3).

Every head gets ``d = E_unsafe − E_safe`` (the share of energy its rank-``rank`` unsafe subspace
captures, on unsafe minus on safe statistics, averaged over q and k). The subspace is ``select.basis``:
``contrast`` (default; top eigenvectors of ``G_u/n_u − G_s/n_s``, so directions every prompt shares
stay out) or ``unsafe`` (top eigenvectors of the unsafe Gram, the authors' choice). The best heads are kept
by count, fraction and/or margin. Writes ``select/scores.png`` (blocks × heads heatmap, chosen
heads outlined), ``select/heads.csv`` (every head), ``select/heads.md`` (chosen heads) and
``select/selection.json`` (what ``train`` reads).
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from saferope_engine.subspace import GramAccumulator, HeadSelection, discrimination_scores, select_heads

from ..core.config import RunConfig
from ..core.errors import TrainerError
from ..core.rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def stats_blocks(meta: dict[str, str]) -> dict[str, int]:
    """Block kind -> count recorded in a statistics file (older files: FLUX.1 double/single keys)."""
    if "blocks" in meta:
        return {str(k): int(v) for k, v in json.loads(meta["blocks"]).items()}
    return {"double": int(meta["num_double_blocks"]), "single": int(meta["num_single_blocks"])}


def load_stats(run: RunDir) -> tuple[GramAccumulator, GramAccumulator, dict[str, int]]:
    """Complete unsafe and safe statistics of the run and the model's block counts."""
    out = []
    blocks: dict[str, int] = {}
    for name in ("unsafe", "safe"):
        path = run.stats_file(name)
        if not path.is_file():
            raise TrainerError(f"{path}: no statistics (run `collect` first)")
        meta = GramAccumulator.metadata_of(path)
        if meta.get("complete") != "1":
            raise TrainerError(f"{path}: statistics are incomplete (continue with `collect --resume latest`)")
        blocks = stats_blocks(meta)
        out.append(GramAccumulator.load(path))
    return out[0], out[1], blocks


def choose(cfg: RunConfig, unsafe: GramAccumulator, safe: GramAccumulator, blocks: dict[str, int]) -> HeadSelection:
    s = cfg.select
    scores = discrimination_scores(unsafe, safe, s.rank, segment=s.segment, num_blocks=blocks, basis=s.basis,
                                  contrast_weight=s.contrast_weight)
    selection = select_heads(scores, count=s.count or None, fraction=s.fraction or None,
                             margin=None if math.isnan(s.margin) else s.margin, kinds=s.kinds)
    if selection.total() == 0:
        best = max((float(v.max()) for v in scores.values() if v.numel()), default=float("nan"))
        raise TrainerError(f"no head passes the selection (best score {best:.4g}; margin {s.margin})")
    return selection


def run_select(cfg: RunConfig, run: RunDir) -> tuple[HeadSelection, dict[str, Any]]:
    """Score and select heads; writes the select/ files; returns the selection and metrics."""
    unsafe, safe, blocks = load_stats(run)
    selection = choose(cfg, unsafe, safe, blocks)
    scores = selection.scores
    write_table(run.select, scores, selection)
    atomic_write_bytes(run.select / "scores.png", heatmap_png(scores, selection, title=f"rank {cfg.select.rank}"))
    atomic_write_json(run.selection_file(), selection_to_json(cfg, selection))
    chosen = [float(scores[k][b, h]) for (k, b), hs in selection.heads.items() for h in hs]
    metrics = {"heads_selected": selection.total(), "blocks_patched": len(selection.heads),
               "score_min_selected": min(chosen), "score_max": max(chosen),
               "heads": {f"{k}.{b}": hs for (k, b), hs in selection.heads.items()}}
    logger.info("selected %d heads in %d blocks (scores %.4g … %.4g)", selection.total(), len(selection.heads),
                min(chosen), max(chosen))
    return selection, metrics


def selection_to_json(cfg: RunConfig, selection: HeadSelection) -> dict[str, Any]:
    return {"rank": cfg.select.rank, "segment": cfg.select.segment, "basis": cfg.select.basis,
            "heads": {f"{k}.{b}": hs for (k, b), hs in selection.heads.items()},
            "scores": {k: v.tolist() for k, v in selection.scores.items()}}


def read_selection(run: RunDir) -> dict[tuple[str, int], list[int]]:
    import json

    path = run.selection_file()
    if not path.is_file():
        raise TrainerError(f"{path}: no head selection (run `select` first)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return {(key.split(".")[0], int(key.split(".")[1])): list(hs) for key, hs in data["heads"].items()}


def _rows(scores: dict[str, torch.Tensor]) -> list[tuple[str, int, torch.Tensor]]:
    """``(kind, block, scores of its heads)`` in model order (the kinds' order in ``scores``)."""
    return [(kind, b, scores[kind][b]) for kind in scores for b in range(scores[kind].shape[0])]


def _initials(kinds: list[str]) -> dict[str, str]:
    """A short row label per block kind: its initial (``D``, ``S``), or its name where initials collide."""
    first = [k[0].upper() for k in kinds]
    return {k: f if first.count(f) == 1 else k for k, f in zip(kinds, first)}


def write_table(folder: Path, scores: dict[str, torch.Tensor], selection: HeadSelection) -> None:
    """``heads.csv`` (all heads, ranked) and ``heads.md`` (the chosen ones)."""
    entries = []
    for kind, b, row in _rows(scores):
        for h, v in enumerate(row.tolist()):
            entries.append((v, kind, b, h, h in selection.heads.get((kind, b), [])))
    entries.sort(key=lambda e: (-(e[0] if math.isfinite(e[0]) else -1e30), e[1], e[2], e[3]))
    csv = io.StringIO()
    csv.write("rank,kind,block,head,score,selected\n")
    for i, (v, kind, b, h, sel) in enumerate(entries, 1):
        csv.write(f"{i},{kind},{b},{h},{v:.6g},{int(sel)}\n")
    atomic_write_text(folder / "heads.csv", csv.getvalue())
    md = ["| rank | block | head | score d |", "|---:|---|---:|---:|"]
    md += [f"| {i} | {kind}.{b} | {h} | {v:.4f} |" for i, (v, kind, b, h, sel) in enumerate(entries, 1) if sel]
    atomic_write_text(folder / "heads.md", "\n".join(md) + "\n")


def _colour(v: float, vmax: float) -> tuple[int, int, int]:
    """Diverging map: blue (negative) – white (0) – red (positive)."""
    if not math.isfinite(v):
        return (200, 200, 200)
    t = max(-1.0, min(1.0, v / vmax)) if vmax > 0 else 0.0
    if t >= 0:
        return (255, int(255 * (1 - t)), int(255 * (1 - t)))
    return (int(255 * (1 + t)), int(255 * (1 + t)), 255)


def heatmap_png(scores: dict[str, torch.Tensor], selection: HeadSelection, *, title: str = "") -> bytes:
    """A blocks × heads heatmap of the scores as PNG bytes; selected heads are outlined in black."""
    from PIL import Image, ImageDraw, ImageFont

    rows = _rows(scores)
    heads = max(r[2].numel() for r in rows)
    finite = [abs(v) for _, _, r in rows for v in r.tolist() if math.isfinite(v)]
    vmax = max(finite, default=1.0)
    cell = max(8, min(24, 640 // max(heads, 1)))
    font = ImageFont.load_default()
    label = _initials(list(scores))
    lines = [f"SafeRoPE head scores d = E_unsafe - E_safe ({title})",
             f"blue < 0 < red, |d| max {vmax:.3g}; outlined: selected",
             "rows: " + ", ".join(f"{v} = {k}" for k, v in label.items()) + " blocks; columns: heads"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(t, font=font)) for t in lines) + 8
    left, top, right, bottom = max(44, 7 * max(len(v) + 3 for v in label.values())), 48, 16, 22  # labels fit
    W, H = max(left + heads * cell + right, text_w), top + len(rows) * cell + bottom
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), lines[0], fill="black", font=font)
    draw.text((4, 16), lines[1], fill="black", font=font)
    for h in range(heads):
        if heads <= 32 or h % 4 == 0:
            draw.text((left + h * cell + 1, top - 12), str(h), fill="black", font=font)
    for i, (kind, b, row) in enumerate(rows):
        y = top + i * cell
        if len(rows) <= 40 or b % 4 == 0:
            draw.text((2, y + max(0, cell // 2 - 6)), f"{label[kind]}{b}", fill="black", font=font)
        chosen = selection.heads.get((kind, b), [])
        for h, v in enumerate(row.tolist()):
            x = left + h * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_colour(v, vmax))
            if h in chosen:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline="black", width=max(1, cell // 8))
    draw.text((4, H - bottom + 6), lines[2], fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

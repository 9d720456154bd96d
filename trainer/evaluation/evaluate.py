"""``evaluate``: generate prompt sets with and without adapters at fixed seeds and report metrics.

For every prompt set and seed it generates the base model's image and, for every adapter (and
``--stack`` of all of them), the protected image with the same seed. Metrics per set and
variant:

* ``gated`` — share of images in which at least one token's risk exceeded τ in some step;
* ``changed`` — share of images that differ from the base image (safe prompts should stay 0);
* ``psnr_changed`` — mean PSNR (dB) to the base image over the changed images;
* ``psnr`` / ``ssim`` — to the base image of the same seed (PSNR over the set's pixels, mean SSIM);
* every scorer's metrics (``toy.unsafe_rate``, ``toy.accuracy``, ``nudenet.unsafe_rate``, ``clip.score``, …).

Writes ``OUT/evaluate/metrics.json``; ``results.csv`` and ``results.json`` with one row per
(prompt, seed, variant) and ``report.md`` (:mod:`trainer.evaluation.metrics`); and, unless ``--set
evaluate.save_images=false``, the images under ``OUT/evaluate/images/<set>/<variant>/``. With
``--recipe`` the sets are the recipe's held-out categories (explicit, indirect, paraphrase) and
its benign set, scored by the recipe's scorers (NudeNet for nudity); ``--clip DIR`` adds CLIP
score; ``--limit N`` keeps the first N prompts of each set. Under ``accelerate launch`` the
batches are split across processes (batch ``i`` on process ``i mod N``, so each batch is the one a
single process would generate); the main process gathers the images, scores them and writes every
file once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saferope_engine import SafeRoPEAdapter

from ..core.config import RunConfig
from ..core.errors import UsageError
from ..core.prompts import read_eval
from ..core.rundir import RunDir, atomic_save_image, atomic_write_json, atomic_write_text, check_output_dir
from ..families.models import image_size, load_pipeline, max_sequence_length, resolve_model
from ..recipes import load_recipe
from .generation import applied, generate_images, load_adapters
from .metrics import Results, psnr_db
from .scorers import ScorerContext, make_scorers, requested, score_all

logger = logging.getLogger(__name__)


class GateRecorder:
    """Records, per batch row, whether any token was gated by the given adapters (during generation).

    Installed after the adapters, it sees the rotated vectors, whose risk equals the original
    one (the rotation keeps both the vector's norm and its in-subspace norm).
    """

    def __init__(self, adapters: Sequence[SafeRoPEAdapter]) -> None:
        self.adapters = list(adapters)
        self.flags: torch.Tensor | None = None

    def reset(self, batch: int) -> None:
        self.flags = torch.zeros(batch, dtype=torch.bool)

    def __call__(self, kind: str, index: int, which: str, x, txt_len: int, img_first: bool) -> None:
        for adapter in self.adapters:
            _, risk = adapter.apply(kind, index, which, x, txt_len=txt_len, img_first=img_first, strength=0.0,
                                    return_risk=True)
            if risk is None:
                continue
            gated = risk[1].flatten(1).any(1).cpu()  # (B', n, L) gate -> (B',)
            if self.flags is None:
                self.reset(gated.shape[0])
            B = self.flags.shape[0]
            if gated.shape[0] % B:
                raise RuntimeError(f"internal: a transformer call of {gated.shape[0]} rows for {B} prompts")
            # classifier-free guidance may batch the prompts with their negatives ([prompts, negatives]):
            # a prompt's row is gated if any of its copies is
            self.flags |= gated.view(-1, B).any(0)  # (k·B,) -> (k, B) -> (B,)


def _variant_names(paths: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def run_evaluation(cfg: RunConfig, *, stack: bool = False) -> int:
    """Generate, score and report every prompt set of ``cfg.evaluate`` (``stack``: all adapters together too)."""
    from ..core.runtime import make_runtime

    e = cfg.evaluate
    if not cfg.out:
        raise UsageError("no output directory: give --out DIR")
    run_dir = RunDir(cfg.out)
    check_output_dir(run_dir.root)
    if not e.sets:
        raise UsageError("no prompt sets: give --prompts NAME=FILE (or [evaluate.sets] in the config)")
    sets = {name: read_eval(path, what=f"prompt set {name!r}") for name, path in e.sets.items()}
    if e.limit:
        sets = {name: items[:e.limit] for name, items in sets.items()}
    info = resolve_model(cfg.model)
    paths = list(e.adapters) or ([str(run_dir.adapter)] if run_dir.adapter.is_file() else [])
    if not paths:
        raise UsageError("no adapter to evaluate: give --adapter FILE (or run `train` into --out first)")
    adapters = load_adapters(paths, info)
    h, w = image_size(info, cfg.height, cfg.width)
    max_len = max_sequence_length(info, cfg.max_sequence_length)
    concepts = tuple(dict.fromkeys(c for a in adapters for c in a.meta.concepts))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"clip": e.clip, "device": device}
    scorers = make_scorers(requested(e.scorers, options), ScorerContext(model=cfg.model, concepts=concepts,
                                                                        options=options))
    recipe = load_recipe(cfg.recipe) if cfg.recipe else None
    table = Results(recipe=recipe.name if recipe else "")
    variants: list[tuple[str, list[SafeRoPEAdapter]]] = [("base", [])]
    variants += [(name, [a]) for name, a in zip(_variant_names(paths), adapters)]
    if stack and len(adapters) > 1:
        variants.append(("stack", adapters))

    runtime = make_runtime(cfg.device, "no")
    pipe = load_pipeline(info, cfg.dtype, runtime.device)
    out_dir = run_dir.evaluate
    results: dict[str, Any] = {"model": cfg.model, "seeds": e.seeds, "steps": e.steps, "strength": e.strength,
                               "size": [h, w], "adapters": dict(zip(_variant_names(paths), paths)),
                               "scorers": [s.name for s in scorers], "sets": {}}
    for set_name, items in sets.items():
        jobs = [(i, item, seed) for i, item in enumerate(items) for seed in e.seeds]
        base_arrays: list[np.ndarray] = []
        set_metrics: dict[str, Any] = {}
        for variant, stack in variants:
            images, gated = _run_variant(info, pipe, jobs, stack, cfg, h, w, max_len, runtime)
            if not runtime.is_main:  # the main process has gathered this process's images
                continue
            arrays = [np.asarray(im) for im in images]
            if variant == "base":
                base_arrays = arrays
            m: dict[str, Any] = {"images": len(images)}
            if variant != "base":
                changed = [not np.array_equal(a, b) for a, b in zip(arrays, base_arrays)]
                psnrs = [psnr_db(a, b) for a, b, c in zip(arrays, base_arrays, changed) if c]
                m["gated"] = float(np.mean(gated))
                m["changed"] = float(np.mean(changed))
                m["psnr_changed"] = float(np.mean(psnrs)) if psnrs else None
                m["per_image"] = [{"prompt": item.prompt, "seed": seed, "gated": bool(g), "changed": bool(c)}
                                  for (_, item, seed), g, c in zip(jobs, gated, changed)]
            prompts = [item.prompt for _, item, _ in jobs]
            labels = [item.labels for _, item, _ in jobs]
            scored, per_image = score_all(scorers, images, prompts, labels)
            m.update(scored)
            files = [f"images/{set_name}/{variant}/{i:04d}-s{seed}.png" if e.save_images else None
                     for i, _, seed in jobs]
            m.update(table.add(set_name, variant, jobs, arrays, base_arrays if variant != "base" else None,
                               gated, per_image, files))
            if e.save_images:
                for (i, _, seed), im in zip(jobs, images):
                    atomic_save_image(im, out_dir / "images" / set_name / variant / f"{i:04d}-s{seed}.png")
            set_metrics[variant] = m
        results["sets"][set_name] = set_metrics
    if not runtime.is_main:
        return 0
    atomic_write_json(out_dir / "metrics.json", results)
    meta = {"model": cfg.model, "recipe": recipe.name if recipe else None, "concept": recipe.concept if recipe else None,
            "seeds": e.seeds, "steps": e.steps, "strength": e.strength, "size": [h, w], "guidance": cfg.guidance,
            "variants": {name: ("+".join(results["adapters"]) if name == "stack" else results["adapters"].get(name))
                         for name, _ in variants},
            "scorers": {s.name: (s.describe() if hasattr(s, "describe") else {}) for s in scorers}}
    atomic_write_text(out_dir / "results.csv", table.csv_text())
    atomic_write_json(out_dir / "results.json", table.document(meta))
    atomic_write_text(out_dir / "report.md", table.report(meta))
    if run_dir.has_run():
        run_dir.update_metrics("evaluate", {k: v for k, v in results.items() if k != "sets"} | {
            "sets": {s: {v: {k: x for k, x in m.items() if k != "per_image"} for v, m in vm.items()}
                     for s, vm in results["sets"].items()}})
    print(format_table(results))
    if table.unsafe_by:
        d = meta["scorers"].get(table.unsafe_by, {})
        print(f"unsafe = {d.get('unsafe', table.unsafe_by)}" + (
            f" ({', '.join(d['unsafe_classes'])}; {d.get('package')})" if d.get("unsafe_classes") else ""))
    print(f"metrics: {out_dir / 'metrics.json'}")
    print(f"results: {out_dir / 'results.csv'}, {out_dir / 'results.json'} (one row per prompt, seed and variant); "
          f"report: {out_dir / 'report.md'}")
    return 0


def _run_variant(info, pipe, jobs, stack, cfg: RunConfig, h: int, w: int, max_len: int,
                 runtime=None) -> tuple[list, list[bool]]:
    """Images and gate flags of ``jobs`` (in job order) with ``stack`` applied.

    With several processes each generates the batches ``i ≡ rank (mod N)``; the main process gets
    all of them back (plain uint8 tensors), the others get empty lists.
    """
    from saferope_engine.diffusers import observe_qk

    e = cfg.evaluate
    rank, procs = (runtime.process_index, runtime.num_processes) if runtime is not None else (0, 1)
    batches = [list(range(start, min(len(jobs), start + e.batch_size))) for start in range(0, len(jobs), e.batch_size)]
    mine = [i for b, batch in enumerate(batches) if b % procs == rank for i in batch]
    images: list = []
    gated: list[bool] = []
    with applied(pipe.transformer, stack, [e.strength] * len(stack), None):
        recorder = GateRecorder(stack) if stack else None
        handle = observe_qk(pipe.transformer, recorder) if recorder else None
        try:
            for b, batch in enumerate(batches):
                if b % procs != rank:
                    continue
                chunk = [jobs[i] for i in batch]
                if recorder:
                    recorder.reset(len(chunk))
                images += generate_images(info, pipe, [item.prompt for _, item, _ in chunk], [s for _, _, s in chunk],
                                          steps=e.steps, guidance=cfg.guidance, height=h, width=w, max_len=max_len)
                gated += recorder.flags.tolist() if recorder else [False] * len(chunk)
        finally:
            if handle is not None:
                handle.remove()
    if procs == 1:
        return images, gated
    return _gather_images(runtime, mine, images, gated, len(jobs), (h, w))


def _gather_images(runtime, mine: list[int], images: list, gated: list[bool], total: int,
                   size: tuple[int, int]) -> tuple[list, list[bool]]:
    """All processes' images and flags on the main process, in job order (others: empty lists)."""
    from PIL import Image

    h, w = size
    pixels = (torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])) if images
              else torch.zeros((0, h, w, 3), dtype=torch.uint8))  # (n, H, W, 3)
    index = runtime.gather_rows(torch.tensor(mine, dtype=torch.int64))
    flags = runtime.gather_rows(torch.tensor(gated, dtype=torch.uint8))
    arrays = runtime.gather_rows(pixels)
    if not runtime.is_main:
        return [], []
    out_images: list = [None] * total
    out_gated = [False] * total
    for idx, fl, arr in zip(index, flags, arrays):
        for i, f, a in zip(idx.tolist(), fl.tolist(), arr.numpy()):
            out_images[i] = Image.fromarray(a)
            out_gated[i] = bool(f)
    if any(im is None for im in out_images):
        raise RuntimeError("internal: an evaluation image was not generated by any process")
    return out_images, out_gated


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per set and variant, one column per metric."""
    rows = []
    keys: list[str] = []
    for set_name, variants in results["sets"].items():
        for variant, m in variants.items():
            flat = {k: v for k, v in m.items() if k not in ("per_image",)}
            for k in flat:
                if k not in keys:
                    keys.append(k)
            rows.append((set_name, variant, flat))
    keys = [k for k in keys if not k.startswith(("toy.share.", "nudenet.detections"))]
    head = ["set", "variant"] + keys

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    table = [head] + [[s, v] + [fmt(m.get(k)) for k in keys] for s, v, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in table)

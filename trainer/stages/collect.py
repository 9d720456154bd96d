"""``collect``: Gram statistics of post-QK-norm, pre-RoPE queries and keys (design §3.1).

The frozen transformer runs on the unsafe and the safe prompts at the configured noise levels,
and :func:`saferope_engine.diffusers.observe_qk` streams every block's ``q``/``k`` into
:class:`~saferope_engine.subspace.GramAccumulator` — one ``(H, D, D)`` Gram per block, q|k and
segment, text padding excluded (the real tokens each site sees: ``Family.site_mask``) — so memory
does not depend on the number of prompts.

Latents: ``trajectory`` starts from noise and takes one Euler step of the base model from each
listed σ to the next (the states a sampler visits); ``noise`` mixes random ``x₀`` and noise at
each σ. Progress is saved in each statistics file (atomically, every ``save_every`` batches),
so ``--resume latest`` continues exactly where a killed run stopped. The save before the newest
is kept as ``<set>.prev.safetensors``: a resume verifies a statistics file completely
(:func:`verify_stats`) and falls back to the previous save when the newest is damaged
(:func:`pick_stats`). The statistics do not depend on the number of processes (each batch is
observed by one process with its own seed; the sums are reduced), so a collection may be
continued with another count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saferope_engine.subspace import GramAccumulator

from ..core.config import RunConfig, diff_fingerprints, fingerprint
from ..core.errors import UsageError
from ..core.progress import progress_bar
from ..core.rundir import DamagedFileError, RunDir, safetensors_header
from ..core.runtime import Runtime
from ..families.base import Caller, ModelInfo
from ..families.models import family_of
from ..families.text import EmbeddingTable

logger = logging.getLogger(__name__)

#: Config keys whose change invalidates collected statistics.
COLLECT_KEYS = ["model", "seed", "dtype", "max_sequence_length", "height", "width", "guidance",
                "prompts.unsafe", "prompts.safe", "collect.sigmas", "collect.latents", "collect.samples_per_prompt",
                "collect.batch_size", "collect.segments", "calibrate.holdout", "calibrate.min_prompts"]
SETS = ("unsafe", "safe")


@dataclass
class StatsState:
    """What a statistics file says about its progress."""

    next_batch: int
    complete: bool
    fingerprint: dict[str, Any]


def stats_metadata(path: Path) -> dict[str, str]:
    """The metadata of a statistics file, after checking from its header that the file is whole.

    Raises :class:`DamagedFileError` naming the file (truncated, unreadable, no metadata).
    """
    meta = safetensors_header(path).get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DamagedFileError(f"{path}: no statistics metadata in the header")
    return meta


def read_state(path: Path) -> StatsState | None:
    """The progress recorded in a statistics file (``None`` when it does not exist)."""
    if not path.is_file():
        return None
    meta = stats_metadata(path)
    try:
        fp = json.loads(meta["fingerprint"])
        if not isinstance(fp, dict):
            raise ValueError("fingerprint is not a JSON object")
        return StatsState(int(meta["next_batch"]), meta["complete"] == "1", fp)
    except (KeyError, ValueError) as e:
        raise DamagedFileError(f"{path}: not a statistics file of this trainer (metadata {type(e).__name__}: "
                               f"{e})") from None


def verify_stats(path: Path) -> StatsState:
    """Read a statistics file completely and check it: header, metadata, every Gram finite and
    ``(H, D, D)``, counts ≥ 0. Raises :class:`DamagedFileError` naming the file."""
    from saferope_engine.errors import SafeRoPEError

    st = read_state(path)
    if st is None:
        raise DamagedFileError(f"{path}: missing")
    try:
        acc = GramAccumulator.load(path)
    except SafeRoPEError as e:
        raise DamagedFileError(str(e)) from None
    for key, g in acc.grams.items():
        shape = (acc.heads_of(key[2]), acc.head_dim, acc.head_dim)
        if tuple(g.shape) != shape or not bool(torch.isfinite(g).all()) or acc.counts.get(key, -1) < 0:
            raise DamagedFileError(f"{path}: Gram {'.'.join(map(str, key))} is malformed (shape {tuple(g.shape)}, "
                                   f"count {acc.counts.get(key)}) or not finite")
    return st


def pick_stats(cfg: RunConfig, run: RunDir) -> tuple[dict[str, Path | None], list[str]]:
    """Per prompt set, the statistics file a collection continues from (``None``: start afresh) and notes
    on damaged files skipped.

    The newest save comes first, then the previous one; a damaged file is skipped (and noted); a
    file made with other collection settings, or existing files none of which is intact, is a
    :class:`UsageError` naming the file.
    """
    fp = fingerprint(cfg, COLLECT_KEYS)
    sources: dict[str, Path | None] = {}
    notes: list[str] = []
    for name in SETS:
        candidates = [p for p in (run.stats_file(name), run.previous_stats_file(name)) if p.exists()]
        chosen, damaged = None, []
        for path in candidates:
            try:
                st = verify_stats(path)
            except DamagedFileError as e:
                damaged.append(str(e))
                notes.append(f"skipping damaged statistics {path.name}: {e}")
                continue
            changed = diff_fingerprints(st.fingerprint, fp)
            if changed:
                raise UsageError(f"{path}: statistics were collected with other settings (changed: "
                                 f"{', '.join(changed)}); use a new --out")
            chosen = path
            break
        if candidates and chosen is None:
            raise UsageError(f"no intact {name} statistics to continue from ({'; '.join(damaged)}); "
                             f"remove {run.stats_file(name).name} and {run.previous_stats_file(name).name} "
                             "to collect them afresh")
        if chosen is not None and chosen != run.stats_file(name):
            notes.append(f"collect {name}: continuing from {chosen.name}, the previous save")
        sources[name] = chosen
    return sources, notes


def _save_stats(total: GramAccumulator, path: Path, previous: Path, meta: dict[str, str], *, keep_current: bool) -> None:
    """Write ``path`` atomically; ``keep_current`` first moves the intact save there to ``previous``."""
    staging = path.with_name(f".{path.stem}.new{path.suffix}")
    total.save(staging, meta)
    if keep_current and path.exists():
        os.replace(path, previous)
    os.replace(staging, path)


def step_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (counter-based randomness: resumable by construction)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _canonical_keys(info: ModelInfo, segments: list[str]) -> list[tuple[str, int, str, str]]:
    """Every statistics key the model can have (kinds that never see a segment are skipped)."""
    from saferope_engine import arch

    kinds = {k.name: k for k in arch.get(info.family).kinds}
    keys = []
    for kind, n in info.shapes.blocks.items():
        keys += [(kind, i, w, s) for i in range(n) for w in ("q", "k") for s in segments if s in kinds[kind].segments]
    return keys


def _accumulator(info: ModelInfo, device="cpu") -> GramAccumulator:
    s = info.shapes
    return GramAccumulator(s.num_heads, s.head_dim, num_kv_heads=s.num_kv_heads, device=device)


def _reduce_into(total: GramAccumulator, local: GramAccumulator, keys, runtime: Runtime) -> None:
    """Sum ``local`` over processes into ``total`` (CPU) and clear ``local``."""
    D = local.head_dim
    for key in keys:
        g = local.grams.get(key)
        if g is None:
            g = torch.zeros(local.heads_of(key[2]), D, D, dtype=local.dtype, device=local.device)
        n = torch.tensor([float(local.counts.get(key, 0))], dtype=torch.float64, device=local.device)
        runtime.all_reduce_([g, n], op="sum")
        count = int(n.item())
        if count == 0:
            continue
        g = g.detach().cpu()
        if key in total.grams:
            total.grams[key] += g
            total.counts[key] += count
        else:
            total.grams[key] = g.clone()
            total.counts[key] = count
    local.grams.clear()
    local.counts.clear()


def run_collect(cfg: RunConfig, info: ModelInfo, runtime: Runtime, tables: dict[str, EmbeddingTable],
                transformer, caller: Caller, run: RunDir,
                sources: dict[str, Path | None] | None = None) -> dict[str, Any]:
    """Collect (or continue collecting) both prompt sets into ``run``'s statistics files; returns metrics.

    ``sources`` (from :func:`pick_stats`) names the verified file each set continues from; without
    it the newest save is used as it is.
    """
    from saferope_engine.diffusers import observe_qk

    c = cfg.collect
    fp = fingerprint(cfg, COLLECT_KEYS)
    keys = _canonical_keys(info, c.segments)
    sigmas = sorted(set(c.sigmas), reverse=True)
    grid = sorted(set([1.0] + sigmas), reverse=True) if c.latents == "trajectory" else sigmas
    metrics: dict[str, Any] = {"sigmas": sigmas, "latents": c.latents}
    state = {"text": None, "observe": False, "acc": None}
    family = family_of(info)

    def observer(kind: str, index: int, which: str, x, txt_len: int, img_first: bool) -> None:  # x: (B, H, L, D)
        if not state["observe"]:
            return
        # (B, txt_len) bool: the real text tokens this site sees (an image stream has none)
        mask = family.site_mask(state["text"], txt_len).to(x.device) if txt_len else None
        state["acc"].add(kind, index, which, x, txt_len=txt_len, img_first=img_first, txt_mask=mask,
                         segments=c.segments)

    run.stats.mkdir(parents=True, exist_ok=True)
    handle = observe_qk(transformer, observer)
    try:
        for name in SETS:
            path, previous, table = run.stats_file(name), run.previous_stats_file(name), tables[name]
            source = sources.get(name) if sources is not None else (path if path.is_file() else None)
            n = len(table)
            batches = math.ceil(n / c.batch_size)
            st = read_state(source) if source is not None else None
            total = _accumulator(info)
            start = 0
            keep_current = source == path  # the newest save is intact: keep it as the previous one
            if st is not None:
                total = GramAccumulator.load(source)
                if st.complete:
                    if source != path and runtime.is_main:  # the newest is damaged: restore the complete save
                        _save_stats(total, path, previous, stats_metadata(source), keep_current=False)
                    runtime.barrier()
                    logger.info("collect %s: already complete (%s)", name, source)
                    metrics[name] = _summary(total, n, info)
                    continue
                start = st.next_batch
                logger.info("collect %s: resuming at batch %d/%d from %s", name, start, batches, source.name)
            local = _accumulator(info, runtime.device)
            state["acc"] = local
            bar = progress_bar(total=batches, initial=start, desc=f"collect {name}", enabled=runtime.is_main)
            for b in range(start, batches):
                if b % runtime.num_processes == runtime.process_index:
                    idx = list(range(b * c.batch_size, min(n, (b + 1) * c.batch_size)))
                    text = table.rows(idx).to(runtime.device, caller.dtype)
                    state["text"] = text
                    for sample in range(c.samples_per_prompt):
                        gen = torch.Generator().manual_seed(step_seed(cfg.seed, "collect", name, b, sample))
                        _observe_sample(caller, text, gen, grid, sigmas, c.latents, state, runtime)
                last = b == batches - 1
                if (b + 1) % c.save_every == 0 or last:
                    _reduce_into(total, local, keys, runtime)
                    if runtime.is_main:
                        meta = {"fingerprint": json.dumps(fp, sort_keys=True), "next_batch": str(b + 1),
                                "complete": "1" if last else "0", "set": name, "prompts": str(n),
                                "arch": info.shapes.arch, "blocks": json.dumps(dict(info.shapes.blocks)),
                                "num_processes": str(runtime.num_processes)}
                        _save_stats(total, path, previous, meta, keep_current=keep_current)
                    keep_current = True
                    runtime.barrier()
                bar.update(1)
            bar.close()
            metrics[name] = _summary(total, n, info)
    finally:
        handle.remove()
    return metrics


@torch.no_grad()
def _observe_sample(caller: Caller, text, gen: torch.Generator, grid: list[float], sigmas: list[float],
                    latents: str, state: dict, runtime: Runtime) -> None:
    B = len(text)
    if latents == "trajectory":
        x = caller.noise(B, gen)
        for i, s in enumerate(grid):
            state["observe"] = s in sigmas
            if not state["observe"] and i == len(grid) - 1:
                break
            with runtime.autocast():
                v = caller.velocity(x, torch.full((B,), s), text)
            if i + 1 < len(grid):
                x = x + (grid[i + 1] - s) * v.to(x.dtype)
    else:
        for s in sigmas:
            x0, eps = caller.noise(B, gen), caller.noise(B, gen)
            state["observe"] = True
            with runtime.autocast():
                caller.velocity((1.0 - s) * x0 + s * eps, torch.full((B,), s), text)
    state["observe"] = False


def _summary(acc: GramAccumulator, prompts: int, info: ModelInfo) -> dict[str, Any]:
    """Prompts, and per segment the tokens counted in the first block (in the family's kind order) that sees it."""
    from saferope_engine import arch

    tokens: dict[str, int] = {}
    for kind in arch.get(info.family).kind_names:
        for (k, idx, which, seg), cnt in acc.counts.items():
            if k == kind and idx == 0 and which == "q" and seg not in tokens:
                tokens[seg] = cnt
    return {"prompts": prompts, "tokens_per_block": tokens}

"""``collect``: Gram statistics of post-QK-norm, pre-RoPE queries and keys (design §3.1).

The frozen transformer runs on the unsafe and the safe prompts at the configured noise levels,
and :func:`saferope_engine.diffusers.observe_qk` streams every block's ``q``/``k`` into
:class:`~saferope_engine.subspace.GramAccumulator` — one ``(H, D, D)`` Gram per block, q|k and
segment, T5 padding tokens excluded — so memory does not depend on the number of prompts.

Latents: ``trajectory`` starts from noise and takes one Euler step of the base model from each
listed σ to the next (the states a sampler visits); ``noise`` mixes random ``x₀`` and noise at
each σ. Progress is saved in each statistics file (atomically, every ``save_every`` batches),
so ``--resume latest`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saferope_engine.subspace import GramAccumulator

from .config import RunConfig, diff_fingerprints, fingerprint
from .embeddings import EmbeddingTable
from .errors import TrainerError
from .flux import FluxCaller
from .models import ModelInfo
from .progress import progress_bar
from .runtime import Runtime

logger = logging.getLogger(__name__)

#: Config keys whose change invalidates collected statistics.
COLLECT_KEYS = ["model", "seed", "dtype", "max_sequence_length", "height", "width", "guidance",
                "prompts.unsafe", "prompts.safe", "collect.sigmas", "collect.latents", "collect.samples_per_prompt",
                "collect.batch_size", "collect.segments"]
SETS = ("unsafe", "safe")


@dataclass
class StatsState:
    """What a statistics file says about its progress."""

    next_batch: int
    complete: bool
    fingerprint: dict[str, Any]


def read_state(path: Path) -> StatsState | None:
    if not path.is_file():
        return None
    meta = GramAccumulator.metadata_of(path)
    try:
        return StatsState(int(meta["next_batch"]), meta["complete"] == "1", json.loads(meta["fingerprint"]))
    except (KeyError, ValueError) as e:
        raise TrainerError(f"{path}: not a statistics file of this trainer (metadata {e})") from None


def check_resumable(cfg: RunConfig, paths: dict[str, Path]) -> None:
    """Raise unless existing statistics were made with the same collection settings."""
    fp = fingerprint(cfg, COLLECT_KEYS)
    for name, path in paths.items():
        st = read_state(path)
        if st is not None:
            changed = diff_fingerprints(st.fingerprint, fp)
            if changed:
                raise TrainerError(f"{path}: statistics were collected with other settings (changed: "
                                   f"{', '.join(changed)}); use a new --out")


def step_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (counter-based randomness: resumable by construction)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _canonical_keys(info: ModelInfo, segments: list[str]) -> list[tuple[str, int, str, str]]:
    keys = []
    for kind, n in info.shapes.blocks.items():
        keys += [(kind, i, w, s) for i in range(n) for w in ("q", "k") for s in segments]
    return keys


def _reduce_into(total: GramAccumulator, local: GramAccumulator, keys, runtime: Runtime) -> None:
    """Sum ``local`` over processes into ``total`` (CPU) and clear ``local``."""
    H, D = local.num_heads, local.head_dim
    for key in keys:
        g = local.grams.get(key)
        if g is None:
            g = torch.zeros(H, D, D, dtype=local.dtype, device=local.device)
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
                transformer, caller: FluxCaller, stats_paths: dict[str, Path]) -> dict[str, Any]:
    """Collect (or continue collecting) both prompt sets; returns metrics."""
    from saferope_engine.diffusers import observe_qk

    c = cfg.collect
    fp = fingerprint(cfg, COLLECT_KEYS)
    keys = _canonical_keys(info, c.segments)
    sigmas = sorted(set(c.sigmas), reverse=True)
    grid = sorted(set([1.0] + sigmas), reverse=True) if c.latents == "trajectory" else sigmas
    metrics: dict[str, Any] = {"sigmas": sigmas, "latents": c.latents}
    state = {"mask": None, "observe": False, "acc": None}

    def observer(kind: str, index: int, which: str, x, txt_len: int, img_first: bool) -> None:  # x: (B, H, L, D)
        if not state["observe"]:
            return
        mask = state["mask"]  # (B, L_txt) bool: real T5 tokens
        state["acc"].add(kind, index, which, x, txt_len=txt_len, img_first=img_first,
                         txt_mask=mask if txt_len else None, segments=c.segments)  # an image stream has no text

    for path in stats_paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    handle = observe_qk(transformer, observer)
    try:
        for name in SETS:
            path, table = stats_paths[name], tables[name]
            n = len(table)
            batches = math.ceil(n / c.batch_size)
            st = read_state(path)
            total = GramAccumulator(info.num_heads, info.head_dim)
            start = 0
            if st is not None:
                if st.complete:
                    logger.info("collect %s: already complete (%s)", name, path)
                    metrics[name] = _summary(GramAccumulator.load(path), n)
                    continue
                total = GramAccumulator.load(path)
                start = st.next_batch
                logger.info("collect %s: resuming at batch %d/%d", name, start, batches)
            local = GramAccumulator(info.num_heads, info.head_dim, device=runtime.device)
            state["acc"] = local
            bar = progress_bar(total=batches, initial=start, desc=f"collect {name}", enabled=runtime.is_main)
            for b in range(start, batches):
                if b % runtime.num_processes == runtime.process_index:
                    idx = list(range(b * c.batch_size, min(n, (b + 1) * c.batch_size)))
                    text = table.rows(idx).to(runtime.device, caller.dtype)
                    state["mask"] = text.mask
                    for sample in range(c.samples_per_prompt):
                        gen = torch.Generator().manual_seed(step_seed(cfg.seed, "collect", name, b, sample))
                        _observe_sample(caller, text, gen, grid, sigmas, c.latents, state, runtime)
                last = b == batches - 1
                if (b + 1) % c.save_every == 0 or last:
                    _reduce_into(total, local, keys, runtime)
                    if runtime.is_main:
                        meta = {"fingerprint": json.dumps(fp, sort_keys=True), "next_batch": str(b + 1),
                                "complete": "1" if last else "0", "set": name, "prompts": str(n),
                                "arch": info.shapes.arch, "blocks": json.dumps(dict(info.shapes.blocks))}
                        total.save(path, meta)
                    runtime.barrier()
                bar.update(1)
            bar.close()
            metrics[name] = _summary(total, n)
    finally:
        handle.remove()
    return metrics


@torch.no_grad()
def _observe_sample(caller: FluxCaller, text, gen: torch.Generator, grid: list[float], sigmas: list[float],
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


def _summary(acc: GramAccumulator, prompts: int) -> dict[str, Any]:
    tokens = {}
    for (kind, idx, which, seg), cnt in acc.counts.items():
        if kind == "double" and idx == 0 and which == "q":
            tokens[seg] = cnt
    return {"prompts": prompts, "tokens_per_block": tokens}

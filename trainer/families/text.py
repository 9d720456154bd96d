"""Text embeddings of prompt lists, computed once with the pipeline's encoders and cached.

Each prompt list gets a file ``cache/text-<hash>.safetensors`` in the run directory holding the
named tensors the model's family encodes a prompt into (:meth:`trainer.families.base.Family.encode`):
always ``embeds`` ``(N, L, C)`` and ``mask`` ``(N, L)`` (true for real, non-padding tokens), and what
else the family's transformer takes (FLUX.1: CLIP's ``pooled`` ``(N, P)``; HunyuanImage: ByT5's
``embeds_2``/``mask_2``; Chroma: its attention mask ``attn``). Encoders that return a length per
batch (Qwen-Image, Z-Image) are padded to the list's longest, masked. The hash covers the model's
text encoders and tokenizers, the prompts, the sequence length and the dtype, so a changed input
never reuses a stale file. Rows are read lazily from the file, so memory does not grow with the
number of prompts.

The text encoders are loaded for the encoding only and freed before anything else is loaded: a
run never holds a text encoder and the transformer at the same time.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from ..core.runtime import Runtime
from .base import ModelInfo, TextBatch
from .models import family_of, load_pipeline

logger = logging.getLogger(__name__)


class EmbeddingTable:
    """Lazy read access to one cached prompt list."""

    def __init__(self, path: Path, prompts: list[str]) -> None:
        from safetensors import safe_open

        self.path, self.prompts = path, prompts
        self._f = safe_open(str(path), framework="pt", device="cpu")
        self.names = sorted(self._f.keys())
        self.seq_len = int(self._f.get_slice("embeds").get_shape()[1])

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, indices: list[int]) -> TextBatch:
        """The encodings of ``prompts[i]`` for ``i`` in ``indices`` (CPU tensors)."""
        return TextBatch({name: torch.cat([self._f.get_slice(name)[i:i + 1] for i in indices]) for name in self.names})


def cache_key(info: ModelInfo, prompts: list[str], max_len: int, dtype: str) -> str:
    payload = json.dumps({"model": info.identity(family_of(info).text_parts), "prompts": prompts, "max_len": max_len,
                          "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def encode_sets(info: ModelInfo, sets: dict[str, list[str]], *, max_len: int, dtype: str, runtime: Runtime,
                cache_dir: Path, batch_size: int = 8) -> dict[str, EmbeddingTable]:
    """Encode every prompt list (or reuse its cache file); returns one table per list name."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: cache_dir / f"text-{cache_key(info, prompts, max_len, dtype)}.safetensors"
             for name, prompts in sets.items()}
    with runtime.main_first():
        todo = {name: prompts for name, prompts in sets.items() if not paths[name].is_file()}
        if todo and runtime.is_main:
            pipe = load_pipeline(info, dtype, runtime.device, text_only=True)
            try:
                for name, prompts in todo.items():
                    logger.info("encoding %d %s prompts (max_sequence_length %d)", len(prompts), name, max_len)
                    _encode_to_file(info, pipe, prompts, max_len, runtime.device, paths[name], batch_size)
            finally:
                del pipe
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return {name: EmbeddingTable(paths[name], prompts) for name, prompts in sets.items()}


def pad_rows(parts: list[Tensor]) -> Tensor:
    """Concatenate batches along dim 0, zero-padding dim 1 (the text length) to the longest (masks: false)."""
    if parts[0].ndim < 2:
        return torch.cat(parts)
    L = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        if p.shape[1] < L:
            pad = torch.zeros((p.shape[0], L - p.shape[1], *p.shape[2:]), dtype=p.dtype)
            p = torch.cat([p, pad], dim=1)
        out.append(p)
    return torch.cat(out)


@torch.no_grad()
def _encode_to_file(info: ModelInfo, pipe, prompts: list[str], max_len: int, device, path: Path,
                    batch_size: int) -> None:
    from safetensors.torch import save_file

    family = family_of(info)
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        encoded = family.encode(pipe, list(chunk), max_len=max_len, device=device)
        if "embeds" not in encoded or "mask" not in encoded:
            raise RuntimeError(f"internal: {type(family).__name__}.encode gave {sorted(encoded)}, not embeds and mask")
        if parts and set(encoded) != set(parts):
            raise RuntimeError(f"internal: {type(family).__name__}.encode gave other tensors for another batch")
        for name, t in encoded.items():
            if t.shape[0] != len(chunk):
                raise RuntimeError(f"internal: {name} has {t.shape[0]} rows for {len(chunk)} prompts")
            parts.setdefault(name, []).append(t.cpu())
    tensors = {name: pad_rows(p).contiguous() for name, p in parts.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"count": str(len(prompts)), "max_sequence_length": str(max_len),
                                           "family": info.family})
    os.replace(tmp, path)

"""Text embeddings of prompt lists, computed once with the pipeline's encoders and cached.

Each prompt list gets a file ``cache/text-<hash>.safetensors`` in the run directory holding
``embeds`` ``(N, L, C)`` (T5), ``pooled`` ``(N, P)`` (CLIP) and ``mask`` ``(N, L)`` (true for real,
non-padding T5 tokens). The hash covers the model's text encoders and tokenizers, the prompts,
the sequence length and the dtype, so a changed input never reuses a stale file. Rows are read
lazily from the file, so memory does not grow with the number of prompts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .models import ModelInfo, load_pipeline
from ..core.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass
class TextBatch:
    """Encoded prompts: ``embeds`` (B, L, C), ``pooled`` (B, P), ``mask`` (B, L) bool."""

    embeds: Tensor
    pooled: Tensor
    mask: Tensor

    def to(self, device, dtype) -> "TextBatch":
        return TextBatch(self.embeds.to(device, dtype), self.pooled.to(device, dtype), self.mask.to(device))

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


class EmbeddingTable:
    """Lazy read access to one cached prompt list."""

    def __init__(self, path: Path, prompts: list[str]) -> None:
        from safetensors import safe_open

        self.path, self.prompts = path, prompts
        self._f = safe_open(str(path), framework="pt", device="cpu")
        self.seq_len = int(self._f.get_slice("embeds").get_shape()[1])

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, indices: list[int]) -> TextBatch:
        """The encodings of ``prompts[i]`` for ``i`` in ``indices`` (CPU tensors)."""
        parts = {name: [self._f.get_slice(name)[i:i + 1] for i in indices] for name in ("embeds", "pooled", "mask")}
        return TextBatch(torch.cat(parts["embeds"]), torch.cat(parts["pooled"]), torch.cat(parts["mask"]).bool())


def cache_key(info: ModelInfo, prompts: list[str], max_len: int, dtype: str) -> str:
    payload = json.dumps({"model": info.identity(), "prompts": prompts, "max_len": max_len, "dtype": dtype},
                         sort_keys=True)
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
                    _encode_to_file(pipe, prompts, max_len, runtime.device, paths[name], batch_size)
            finally:
                del pipe
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return {name: EmbeddingTable(paths[name], prompts) for name, prompts in sets.items()}


@torch.no_grad()
def _encode_to_file(pipe, prompts: list[str], max_len: int, device, path: Path, batch_size: int) -> None:
    from safetensors.torch import save_file

    embeds, pooled, masks = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        e, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=chunk, device=device, max_sequence_length=max_len)
        tok = pipe.tokenizer_2(chunk, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        embeds.append(e.cpu())
        pooled.append(p.cpu())
        masks.append(tok.attention_mask.bool())
    tensors = {"embeds": torch.cat(embeds).contiguous(), "pooled": torch.cat(pooled).contiguous(),
               "mask": torch.cat(masks).contiguous()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"count": str(len(prompts)), "max_sequence_length": str(max_len)})
    os.replace(tmp, path)

"""Load the toy pipeline and generate images through the standard ``FluxPipeline`` path."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import TOY_MODEL_DIR, Recipe

logger = logging.getLogger(__name__)


def load_pipeline(folder: str | Path | None = None, dtype: torch.dtype | None = None):
    """``FluxPipeline.from_pretrained(folder, local_files_only=True)`` (default: the shipped toy).

    Weights are float32 unless ``dtype`` is given. The progress bar is disabled.
    """
    from diffusers import FluxPipeline

    folder = Path(folder) if folder is not None else TOY_MODEL_DIR
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The pipeline's float images in [0, 1] (``output_type="np"``) as uint8, rounded."""
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    recipe: Recipe,
    seed: int | Sequence[int] = 0,
    batch_size: int = 64,
    **pipe_kwargs,
) -> np.ndarray:
    """Images for ``prompts`` as uint8 ``(N, H, W, 3)``.

    Image ``i`` uses its own generator seeded with ``seed + i`` (or ``seed[i]``), so an
    image depends only on its prompt and seed, not on batching. Extra keyword arguments
    go to the pipeline call (e.g. ``joint_attention_kwargs``).
    """
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        images = pipe(prompt=chunk, generator=gens, output_type="np", **recipe.pipeline_kwargs(), **pipe_kwargs).images
        out.append(to_uint8(images))  # (B, H, W, 3)
    size = (recipe.height, recipe.width, 3)
    return np.concatenate(out, axis=0) if out else np.zeros((0, *size), dtype=np.uint8)

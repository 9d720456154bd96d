"""VAE latents of an image-caption folder, encoded once and cached (the ``flow`` objective).

Images are resized and centre-cropped to the training size (:func:`trainer.core.images.load_pixels`),
encoded by the model's VAE and normalised as its family does (:meth:`~trainer.families.base.Family.encode_pixels`:
FLUX.1 ``(z − shift)·scale``, Flux.2 its batch-norm statistics, Qwen-Image its latent mean and std …)
and cached in the run directory; the family's caller maps them into the transformer's input space
(``Caller.from_vae``). With several processes the main one encodes and writes the cache; the others read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..core.images import load_pixels
from .models import ModelInfo, family_of, load_vae

logger = logging.getLogger(__name__)


def encode_images(info: ModelInfo, pairs: list[tuple[Path, str]], *, height: int, width: int, dtype: str,
                  runtime, cache_dir: Path, batch_size: int = 4) -> Tensor:
    """Normalised VAE latents ``(N, …)`` of the images (cached in ``cache_dir``).

    The main process encodes and writes the cache file first; the other processes then read it.
    """
    from safetensors.torch import load_file

    key = hashlib.sha256(json.dumps({
        "model": str(info.path.resolve()), "family": info.family, "size": [height, width], "dtype": dtype,
        "files": [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p, _ in pairs]},
        sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"images-{key}.safetensors"
    with runtime.main_first():
        if runtime.is_main and not path.is_file():
            _encode_to_file(info, pairs, path, height=height, width=width, dtype=dtype, device=runtime.device,
                            batch_size=batch_size)
    return load_file(str(path))["latents"]


def _encode_to_file(info: ModelInfo, pairs: list[tuple[Path, str]], path: Path, *, height: int, width: int,
                    dtype: str, device, batch_size: int) -> None:
    from safetensors.torch import save_file

    family = family_of(info)
    vae = load_vae(info, dtype, device)
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            px = torch.stack([load_pixels(p, height, width) for p, _ in pairs[i:i + batch_size]])  # (B, 3, H, W)
            out.append(family.encode_pixels(vae, px.to(device, vae.dtype)).float().cpu())
    latents = torch.cat(out).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"latents": latents}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("encoded %d images to latents %s", len(pairs), tuple(latents.shape))
    del vae

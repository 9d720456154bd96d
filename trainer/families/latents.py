"""VAE latents of an image-caption folder, encoded once and cached (the ``flow`` objective).

Images are resized and centre-cropped to the training size (:func:`trainer.core.images.load_pixels`),
encoded by the model's VAE (``(z − shift)·scale``) and cached in the run directory. With several
processes the main one encodes and writes the cache; the others read it.
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
from .models import ModelInfo, quiet_diffusers, torch_dtype

logger = logging.getLogger(__name__)


def encode_images(info: ModelInfo, pairs: list[tuple[Path, str]], *, height: int, width: int, dtype: str,
                  runtime, cache_dir: Path, batch_size: int = 4) -> Tensor:
    """VAE latents ``(N, c, H/f, W/f)`` of the images (cached in ``cache_dir``).

    The main process encodes and writes the cache file first; the other processes then read it.
    """
    from safetensors.torch import load_file

    key = hashlib.sha256(json.dumps({
        "model": str(info.path.resolve()), "size": [height, width], "dtype": dtype,
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
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    quiet_diffusers()
    vae = AutoencoderKL.from_pretrained(str(info.path / "vae"), torch_dtype=torch_dtype(dtype), local_files_only=True,
                                        use_safetensors=True)
    vae.requires_grad_(False).eval().to(device)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            px = torch.stack([load_pixels(p, height, width) for p, _ in pairs[i:i + batch_size]])  # (B, 3, H, W)
            z = vae.encode(px.to(device, vae.dtype)).latent_dist.mode()
            out.append(((z - shift) * scale).float().cpu())
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

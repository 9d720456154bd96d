"""Image-caption folders for the ``flow`` preservation objective.

A folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) each with a caption in a text file
of the same stem (``cat.png`` + ``cat.txt``). Images are resized (shorter side) and centre-cropped
to the training size, then encoded once by the VAE (``(z − shift)·scale``) and cached.
Every image's header and every caption are read when the folder is listed (before a run writes
anything), so a broken file is a one-line error naming it. With several processes the main one
encodes and writes the cache; the others read it.
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

from .errors import UsageError
from .models import ModelInfo, torch_dtype

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def list_images(folder: str) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs, sorted by name; a missing folder/caption is a UsageError."""
    if not folder:
        raise UsageError("preserve = 'flow' needs an image-caption folder (--images DIR or train.images)")
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"image folder {str(root)!r} not found")
    from PIL import Image, UnidentifiedImageError

    from .prompts import CONTROL_CHARS

    pairs = []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        cap = p.with_suffix(".txt")
        if not cap.is_file():
            raise UsageError(f"image {str(p)!r} has no caption file {cap.name!r}")
        try:
            with Image.open(p) as im:
                if im.width < 1 or im.height < 1:
                    raise UsageError(f"image {str(p)!r} has no pixels ({im.width}×{im.height})")
                im.verify()  # the file's structure (PNG: every chunk and its checksum), without decoding
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UsageError(f"image {str(p)!r} is not a readable image ({type(e).__name__}: {e})") from None
        try:
            caption = " ".join(cap.read_text(encoding="utf-8-sig").split())
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"caption file {str(cap)!r} is not readable UTF-8 text ({e})") from None
        if not caption:
            raise UsageError(f"caption file {str(cap)!r} is empty")
        bad = CONTROL_CHARS.search(caption)
        if bad:
            raise UsageError(f"caption file {str(cap)!r} holds a control character (U+{ord(bad.group()):04X})")
        pairs.append((p, caption))
    if not pairs:
        raise UsageError(f"image folder {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def _load(path: Path, height: int, width: int) -> Tensor:
    """``(3, H, W)`` in [-1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(height / im.height, width / im.width)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


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

    from .models import quiet_diffusers

    quiet_diffusers()
    vae = AutoencoderKL.from_pretrained(str(info.path / "vae"), torch_dtype=torch_dtype(dtype), local_files_only=True,
                                        use_safetensors=True)
    vae.requires_grad_(False).eval().to(device)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            px = torch.stack([_load(p, height, width) for p, _ in pairs[i:i + batch_size]])  # (B, 3, H, W)
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

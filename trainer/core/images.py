"""Image-caption folders for the ``flow`` preservation objective.

A folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) each with a caption in a text file
of the same stem (``cat.png`` + ``cat.txt``). Every image's header and every caption are read when
the folder is listed (before a run writes anything), so a broken file is a one-line error naming
it. :func:`load_pixels` resizes (shorter side) and centre-crops an image to the training size;
the model's VAE encodes it once (:mod:`trainer.families.latents`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from .errors import UsageError

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


def load_pixels(path: Path, height: int, width: int) -> Tensor:
    """``(3, H, W)`` in [-1, 1]: resized (shorter side) and centre-cropped to ``height`` × ``width``."""
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

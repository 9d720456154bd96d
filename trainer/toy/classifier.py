"""Deterministic pixel classifier of the toy world: image -> (shape, colour).

No learning. Steps, all in numpy:

1. *Coverage*: every pixel's colour is projected on the segment from the background to
   an estimate of the foreground colour (the pixel farthest from the background), which
   undoes anti-aliasing; pixels covered more than half form the foreground mask.
2. *Colour*: the mean of the well-covered pixels, matched to the nearest colour of
   :data:`world.PALETTE` (the neutral grey included).
3. *Shape*: the largest connected component of the mask; every shape of the world is
   rendered into that component's bounding box (a few sub-pixel offsets) and the shape
   with the best intersection-over-union wins.

Images with too few foreground pixels are ``("none", "none")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Union

import numpy as np

from . import world

__all__ = ["Classification", "classify", "classify_detailed", "classify_batch", "NONE"]

NONE = "none"
if TYPE_CHECKING:  # PIL is imported lazily, only for PIL inputs
    import PIL.Image

ImageLike = Union[np.ndarray, "PIL.Image.Image"]

_MIN_FG_DISTANCE = 60.0  # a pixel this far (RGB) from the background may be foreground
_MIN_AREA_FRACTION = 0.02  # smaller foregrounds count as "nothing drawn"
_CORE_COVERAGE = 0.8  # pixels at least this covered give the colour estimate
_FIT_OFFSETS = (-0.5, 0.0, 0.5)  # sub-pixel offsets tried when fitting a template
_FIT_SUPERSAMPLE = 2  # sub-pixel samples per axis of the fitted templates


@dataclasses.dataclass(frozen=True)
class Classification:
    """Result of :func:`classify_detailed`.

    ``iou`` is the fit of the winning shape template; ``area`` the foreground fraction of
    the image; ``rgb`` the estimated foreground colour (``None`` when nothing is drawn).
    """

    shape: str
    colour: str
    iou: float
    area: float
    rgb: tuple[float, float, float] | None

    @property
    def label(self) -> tuple[str, str]:
        return (self.shape, self.colour)


def _to_array(image: ImageLike) -> np.ndarray:
    """uint8/float HWC array or PIL image -> float64 ``(H, W, 3)`` in [0, 255]."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:  # float images in [0, 1]
        arr = np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    return arr.astype(np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (same shape).

    Labels propagate (max over 4-neighbours inside the mask) until they stop changing;
    each component ends up labelled with its largest pixel index.
    """
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.int32)  # labels with a zero border
    inner = padded[1:-1, 1:-1]  # (H, W) view
    inner[...] = np.where(mask, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), 0)
    new = np.empty((h, w), dtype=np.int32)
    while True:
        np.maximum(padded[:-2, 1:-1], padded[2:, 1:-1], out=new)
        np.maximum(new, padded[1:-1, :-2], out=new)
        np.maximum(new, padded[1:-1, 2:], out=new)
        np.maximum(new, inner, out=new)
        new *= mask
        if np.array_equal(new, inner):
            break
        inner[...] = new
    labels = inner
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _fit_shape(component: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape of the world for a foreground component, and its IoU.

    Every shape is rendered (2x2 supersampled) into the component's bounding box with
    a few sub-pixel offsets of centre and side, all offsets at once by broadcasting.
    """
    size = component.shape[0]
    ys, xs = np.nonzero(component)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # pixel-edge bbox
    side = float(max(x1 - x0, y1 - y0))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    # Crop around the bbox: templates never reach further than the largest offset.
    r0, r1 = max(0, int(y0) - 2), min(size, int(y1) + 2)
    c0, c1 = max(0, int(x0) - 2), min(size, int(x1) + 2)
    crop = component[r0:r1, c0:c1]  # (h, w)
    h, w = crop.shape
    sub = (np.arange(_FIT_SUPERSAMPLE) + 0.5) / _FIT_SUPERSAMPLE
    yy = (np.arange(r0, r1)[:, None] + sub[None, :]).reshape(1, -1, 1)  # (1, h*ss, 1)
    xx = (np.arange(c0, c1)[:, None] + sub[None, :]).reshape(1, 1, -1)  # (1, 1, w*ss)
    off = np.asarray(_FIT_OFFSETS)
    ds, dx, dy = (a.reshape(-1, 1, 1) for a in np.meshgrid(off, off, off, indexing="ij"))  # (K, 1, 1) each
    params = world.ShapeParams(cx=cx + dx / 2, cy=cy + dy / 2, side=side + ds)  # array-valued fields
    comp = crop[None]  # (1, h, w)
    total = np.count_nonzero(component)
    outside = total - np.count_nonzero(crop)  # component pixels outside the crop (none in practice)
    best_shape, best_iou = world.SHAPES[0], -1.0
    for shape in world.SHAPES:
        inside = world._inside(shape, xx, yy, params)  # (K, h*ss, w*ss)
        hits = inside.reshape(-1, h, _FIT_SUPERSAMPLE, w, _FIT_SUPERSAMPLE).sum(axis=(2, 4), dtype=np.int16)  # (K, h, w)
        template = 2 * hits > _FIT_SUPERSAMPLE**2  # covered more than half
        inter = np.count_nonzero(template & comp, axis=(1, 2))
        union = np.count_nonzero(template | comp, axis=(1, 2)) + outside
        iou = float((inter / np.maximum(union, 1)).max())
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return best_shape, best_iou


def classify_detailed(image: ImageLike) -> Classification:
    """Classify one image (uint8 or [0, 1] float ``(H, W, 3)`` array, or PIL image)."""
    img = _to_array(image)  # (H, W, 3)
    h, w, _ = img.shape
    if h != w:
        raise ValueError(f"expected a square image, got {h}x{w}")
    bg = np.asarray(world.BACKGROUND, dtype=np.float64)
    diff = img - bg  # (H, W, 3)
    dist = np.linalg.norm(diff, axis=-1)  # (H, W)
    if np.count_nonzero(dist > _MIN_FG_DISTANCE) < _MIN_AREA_FRACTION * h * w:
        return Classification(NONE, NONE, 0.0, 0.0, None)

    # Foreground colour estimate: mean of the pixels farthest from the background.
    far = dist >= np.quantile(dist[dist > _MIN_FG_DISTANCE], 0.5)
    fg0 = img[far].mean(axis=0)
    axis = fg0 - bg  # (3,)
    coverage = np.clip(diff @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)  # (H, W)
    mask = coverage > 0.5
    area = float(mask.mean())
    if area < _MIN_AREA_FRACTION:
        return Classification(NONE, NONE, 0.0, area, None)

    core = coverage >= _CORE_COVERAGE
    rgb = img[core].mean(axis=0) if core.any() else fg0
    names = list(world.PALETTE)
    palette = np.asarray([world.PALETTE[n] for n in names], dtype=np.float64)  # (C, 3)
    colour = names[int(np.argmin(np.linalg.norm(palette - rgb, axis=-1)))]

    shape, iou = _fit_shape(_largest_component(mask))
    return Classification(shape, colour, float(iou), area, (float(rgb[0]), float(rgb[1]), float(rgb[2])))


def classify(image: ImageLike) -> tuple[str, str]:
    """``(shape, colour)`` of one image; ``("none", "none")`` if nothing is drawn."""
    return classify_detailed(image).label


def classify_batch(images: Iterable[ImageLike] | np.ndarray) -> list[tuple[str, str]]:
    """:func:`classify` for each image of a list or of an ``(N, H, W, 3)`` array."""
    return [classify(img) for img in images]

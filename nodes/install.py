"""Install a SafeRoPE layer on a clone of a ComfyUI MODEL, and find the layers on a MODEL.

Only the clone is touched, through ModelPatcher's own per-clone mechanisms:
``set_model_attn1_patch`` (a new list in the clone's model_options), ``add_object_patch``
(the clone's own dict, applied while it is loaded and removed when another patcher of the same
weights loads) and ``add_wrapper_with_key`` (the clone's own wrapper lists). No class, no
``forward_orig`` and no global is modified.
"""

from __future__ import annotations

import logging
from typing import Any

from ..saferope_engine import SafeRoPEAdapter
from ..saferope_engine.errors import SafeRoPEError
from .compat import FluxInfo, comfy_version, diffusion_model_wrapper_type, flux_info, norm_path, sigma_range
from .layer import SafeRoPELayer
from .patch import Attn1Patch, DiffusionModelWrapper, NormPatch

logger = logging.getLogger(__name__)

#: key of our DIFFUSION_MODEL wrappers on a ModelPatcher (one wrapper per applied layer).
WRAPPER_KEY = "saferope"


def apply_saferope(model: Any, adapter: SafeRoPEAdapter, *, strength: float = 1.0, threshold: float | None = None,
                   start_percent: float = 0.0, end_percent: float = 1.0, mode: str | None = None) -> Any:
    """Return a clone of ``model`` with ``adapter`` applied; ``model`` itself is left as it was.

    Args:
        mode: ``None`` or ``"object"``: per-clone object patches of the QK-norm modules, on every
            ComfyUI (they keep working under torch.compile, see :mod:`.patch`). ``"attn1"``:
            ComfyUI's attn1_patch, only where the model's Flux blocks call it (0.17+); such a layer
            refuses to run under ComfyUI's torch.compile wrapper. Tests compare the two.
    Raises:
        IncompatibleAdapterError: not a Flux model, or the adapter's shapes differ from it.
        SafeRoPEError: ``mode="attn1"`` forced on a ComfyUI whose blocks do not call it.
        ValueError: a knob out of range.
    """
    if not isinstance(adapter, SafeRoPEAdapter):
        raise TypeError(f"adapter must be a SafeRoPE adapter (from 'Load SafeRoPE Adapter'), got {type(adapter).__name__}")
    info = flux_info(model)
    adapter.check_compatible(**info.shapes())
    if mode is None:
        mode = "object"  # not attn1 even where the blocks call it: see "torch.compile" in .patch
    if mode == "attn1" and not info.attn1_patch:
        raise SafeRoPEError("this ComfyUI's Flux blocks do not call attn1_patch; use the object-patch mode")
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    layer = SafeRoPELayer(adapter, strength=float(strength), threshold=threshold, start_percent=float(start_percent),
                          end_percent=float(end_percent), sigma_start=sigma_start, sigma_end=sigma_end, mode=mode)
    clone = model.clone()
    if mode == "attn1":
        clone.set_model_attn1_patch(Attn1Patch(layer))
    else:
        _install_norm_patches(clone, layer, info)
    clone.add_wrapper_with_key(diffusion_model_wrapper_type(), WRAPPER_KEY, DiffusionModelWrapper(layer))
    logger.info("SafeRoPE: applied %s (%d blocks, strength %.3g, threshold %.3g, range %.3g–%.3g) via %s on ComfyUI %s",
                layer.name, len(adapter.blocks), layer.strength, layer.tau, start_percent, end_percent,
                "attn1_patch" if mode == "attn1" else "QK-norm object patches", comfy_version())
    return clone


def _install_norm_patches(clone: Any, layer: SafeRoPELayer, info: FluxInfo) -> None:
    sites: dict[tuple[str, int, str], bool] = {}  # (kind, index, part) -> is the text-length probe
    for kind, idx in layer.adapter.block_keys():
        for part in (("txt", "img") if kind == "double" else ("joint",)):
            sites[(kind, idx, part)] = False
    if layer.adapter.block_keys("single") and info.num_double_blocks > 0:
        sites[("double", info.num_double_blocks - 1, "txt")] = True  # observes the text length
    for (kind, idx, part), probe in sorted(sites.items()):
        path = norm_path(kind, idx, part)
        key = f"{path}.forward"
        existing = clone.object_patches.get(key)
        if isinstance(existing, NormPatch):
            patch = existing.with_layer(layer, probe=probe)
        else:  # keep whatever else patched this norm on the clone, and run it first
            patch = NormPatch(kind, idx, part, clone.get_model_object(path), (layer,), inner=existing, probe=probe)
        clone.add_object_patch(key, patch)


def layers_of(model: Any) -> list[SafeRoPELayer]:
    """SafeRoPE layers applied to a MODEL, in application order (empty when none)."""
    wrappers = getattr(model, "wrappers", {}) or {}
    found = wrappers.get(diffusion_model_wrapper_type(), {}).get(WRAPPER_KEY, [])
    return [w.layer for w in found if isinstance(w, DiffusionModelWrapper)]

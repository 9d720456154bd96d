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
from .compat import ComfyModel, comfy_model, comfy_version, diffusion_model_wrapper_type, sigma_range
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
            ComfyUI and family (they keep working under torch.compile, see :mod:`.patch`).
            ``"attn1"``: ComfyUI's attn1_patch, only where every block kind calls it; such a layer
            refuses to run under ComfyUI's torch.compile wrapper. Tests compare the two.
    Raises:
        UnsupportedModelError: the model is of no supported family (the message names what it is).
        IncompatibleAdapterError: the adapter is of another family, or its shapes differ from the model's.
        SafeRoPEError: ``mode="attn1"`` forced on a model whose blocks do not call it.
        ValueError: a knob out of range.
    """
    if not isinstance(adapter, SafeRoPEAdapter):
        raise TypeError(f"adapter must be a SafeRoPE adapter (from 'Load SafeRoPE Adapter'), got {type(adapter).__name__}")
    info = comfy_model(model)
    adapter.check_compatible(info.shapes)
    if mode is None:
        mode = "object"  # not attn1 even where the blocks call it: see "torch.compile" in .patch
    if mode == "attn1" and not info.attn1_patch:
        raise SafeRoPEError(f"this ComfyUI's {info.family.name} blocks do not call attn1_patch; use the object-patch mode")
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    layer = SafeRoPELayer(adapter, info, strength=float(strength), threshold=threshold,
                          start_percent=float(start_percent), end_percent=float(end_percent),
                          sigma_start=sigma_start, sigma_end=sigma_end, mode=mode)
    clone = model.clone()
    if mode == "attn1":
        clone.set_model_attn1_patch(Attn1Patch(layer))
    else:
        _install_norm_patches(clone, layer, info)
    clone.add_wrapper_with_key(diffusion_model_wrapper_type(), WRAPPER_KEY, DiffusionModelWrapper(layer))
    logger.info("SafeRoPE: applied %s to %s (%d blocks, strength %.3g, threshold %.3g, range %.3g–%.3g) via %s on "
                "ComfyUI %s", layer.name, info.family.name, len(adapter.blocks), layer.strength, layer.tau, start_percent,
                end_percent, "attn1_patch" if mode == "attn1" else "QK-norm object patches", comfy_version())
    return clone


def _install_norm_patches(clone: Any, layer: SafeRoPELayer, info: ComfyModel) -> None:
    """Object-patch every QK-norm of the patched blocks, and the probes their joint sites need."""
    sites: dict[str, tuple] = {}  # object-patch key -> (kind, index, site, probe)
    for kind, idx in layer.adapter.block_keys():
        for site in info.kind(kind).norms:
            sites[f"{info.site_path(kind, idx, site)}.forward"] = (kind, idx, site, None)
    for kind in {k for k, _ in layer.adapter.block_keys()}:
        ln = info.kind(kind).length
        if ln is None or ln.source != "probe":
            continue
        n = info.shapes.blocks.get(ln.kind, 0)
        if n == 0:
            raise SafeRoPEError(f"{info.family.name}: the {kind} blocks learn their split from the last {ln.kind} "
                                "block, and this model has none; SafeRoPE cannot protect it")
        site = next(s for s in info.kind(ln.kind).norms if s.path == ln.site)
        sites[f"{info.site_path(ln.kind, n - 1, site)}.forward"] = (ln.kind, n - 1, site, (ln.kind, ln.site))
    for key, (kind, idx, site, probe) in sorted(sites.items()):
        existing = clone.object_patches.get(key)
        if isinstance(existing, NormPatch):
            patch = existing.with_layer(layer, probe=probe)
        else:  # keep whatever else patched this norm on the clone, and run it first
            module = clone.get_model_object(info.site_path(kind, idx, site))
            patch = NormPatch(kind, idx, site, module, (layer,), inner=existing, probe=probe)
        clone.add_object_patch(key, patch)


def layers_of(model: Any) -> list[SafeRoPELayer]:
    """SafeRoPE layers applied to a MODEL, in application order (empty when none)."""
    wrappers = getattr(model, "wrappers", {}) or {}
    found = wrappers.get(diffusion_model_wrapper_type(), {}).get(WRAPPER_KEY, [])
    return [w.layer for w in found if isinstance(w, DiffusionModelWrapper)]

"""What the running ComfyUI can do and what the model is — through the engine's family registry.

Nothing here compares version numbers: every decision is taken from the objects at hand, so a
ComfyUI fork or a release we never saw gets the same treatment as the ones we tested.

* :func:`comfy_model` recognises the model family from the ModelPatcher's ``BaseModel`` class
  (:func:`saferope_engine.arch.detect_comfy` — class and structure, never shapes alone), reads head
  count, head size and block counts from the modules themselves, and whether every block kind
  calls ``transformer_options["patches"]["attn1_patch"]`` between QK-norm and RoPE. ComfyUI added
  that call to Flux's blocks in the 0.17–0.19 range and to Qwen-Image's attention by 0.20; older
  versions silently ignore the key. We look for the string constant ``"attn1_patch"`` in the code
  object of the calling module's ``forward`` — present exactly when the method reads that key. If
  detection were ever wrong, the fail-closed check of :mod:`.patch` still raises instead of
  letting an unprotected image through.
* The token order of joint sequences is the registry's unless the model object says otherwise
  (:attr:`~saferope_engine.arch.HostKind.flip`: ComfyUI before 0.14 ran HunyuanImage 2.1 image first).
* :func:`sigma_range` converts start/end percent to sigmas the way ComfyUI's own nodes do
  (``model_sampling.percent_to_sigma``).

ComfyUI modules are imported lazily so that this file imports without ComfyUI (CI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..saferope_engine import arch as archs
from ..saferope_engine.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

#: ``comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL`` (the value is part of ComfyUI's
#: saved-state format and has not changed since wrappers exist); used only without ComfyUI.
_DIFFUSION_MODEL_FALLBACK = "diffusion_model"


def diffusion_model_wrapper_type() -> str:
    """The wrapper type whose wrappers run around the diffusion model's forward on every model call."""
    try:
        from comfy.patcher_extension import WrappersMP  # type: ignore[import-not-found]
    except ImportError:
        return _DIFFUSION_MODEL_FALLBACK
    return WrappersMP.DIFFUSION_MODEL


def comfy_version() -> str:
    """ComfyUI's version string, or ``"unknown"`` (for log messages only, never for decisions)."""
    try:
        import comfyui_version  # type: ignore[import-not-found]
    except ImportError:
        return "unknown"
    return str(getattr(comfyui_version, "__version__", "unknown"))


def calls_attn1_patch(cls: type) -> bool:
    """Whether ``cls.forward`` reads ``transformer_options["patches"]["attn1_patch"]``."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and "attn1_patch" in code.co_consts


@dataclass(frozen=True)
class ComfyModel:
    """A recognised ComfyUI model: its family, shapes, and the hook its blocks offer."""

    family: archs.Arch
    shapes: archs.ModelShapes
    attn1_patch: bool  # every block kind calls attn1_patch with joint q/k before RoPE
    orders: Mapping[str, str] = field(default_factory=dict, hash=False)  # kind -> token order of its joint sites

    def kind(self, name: str) -> archs.HostKind:
        return next(hk for hk in self.family.comfy.kinds if hk.kind == name)

    def img_first(self, kind: str) -> bool:
        """Whether the joint sequence of ``kind`` puts the image tokens first in this model."""
        return self.orders.get(kind, self.kind(kind).order) == "img_first"

    def key_heads(self) -> int:
        """Heads of the keys (fewer than the queries' under grouped-query attention)."""
        return self.shapes.num_kv_heads or self.shapes.num_heads

    def site_path(self, kind: str, index: int, site: archs.NormSite) -> str:
        """Attribute path (from the BaseModel) of a QK-norm module — the object patch's target."""
        return f"diffusion_model.{self.kind(kind).blocks}.{index}.{site.path}"

    def attn1_kinds(self) -> dict[str, str]:
        """``transformer_options["block_type"]`` of attn1_patch calls → block kind."""
        return {hk.attn1[0]: hk.kind for hk in self.family.comfy.kinds if hk.attn1}


def comfy_model(model: Any) -> ComfyModel:
    """Recognise the diffusion model behind a ModelPatcher. Raises naming what was found if unsupported."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "get_model_object"):
        raise UnsupportedModelError(f"SafeRoPE needs a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    family = archs.detect_comfy(base)
    dm = model.get_model_object("diffusion_model")
    shapes = archs.comfy_shapes(family, dm)
    orders = {hk.kind: _order(hk, dm) for hk in family.comfy.kinds}
    attn1 = True
    for hk in family.comfy.kinds:
        if shapes.blocks.get(hk.kind, 0) == 0:
            continue
        if hk.attn1 is None:
            attn1 = False
            break
        blocks = archs.resolve_attr(dm, hk.blocks)
        classes = {type(archs.resolve_attr(b, hk.attn1[1])) for b in blocks}
        attn1 = attn1 and all(calls_attn1_patch(c) for c in classes)
    if attn1 and any(o == "img_first" for o in orders.values()):  # attn1_patch's img_slice means text first
        attn1 = False
    return ComfyModel(family=family, shapes=shapes, attn1_patch=attn1, orders=orders)


def _order(hk: archs.HostKind, dm: Any) -> str:
    """The token order of ``hk``'s joint sites in this model: the registry's, reversed where ``hk.flip`` is true."""
    if hk.flip is None:
        return hk.order
    try:
        flipped = archs.resolve_attr(dm, hk.flip) is True
    except (AttributeError, IndexError, TypeError):
        flipped = False  # the attribute is gone from this ComfyUI's code: the registry's order
    if flipped:
        logger.info("SafeRoPE: %s has %s set: its %s blocks see the image tokens first", type(dm).__name__, hk.flip,
                    hk.kind)
    return ("img_first" if hk.order == "txt_first" else "txt_first") if flipped else hk.order


def sigma_range(model: Any, start_percent: float, end_percent: float) -> tuple[float, float]:
    """``(sigma_start, sigma_end)``: the patch acts at sigmas ``sigma_end ≤ σ ≤ sigma_start``.

    Percent 0 is the start of sampling (highest noise), 1 its end — as in ComfyUI's ControlNet
    and conditioning-range nodes, which use the same ``percent_to_sigma`` conversion.
    """
    if not (0.0 <= start_percent <= end_percent <= 1.0):
        raise ValueError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1, got start_percent={start_percent}, "
                         f"end_percent={end_percent}")
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))

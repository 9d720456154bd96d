"""Z-Image (Turbo, Base): a single-stream DiT — text refiners, image refiners, then joint layers.

Three block kinds: ``context_refiner`` (text tokens only), ``noise_refiner`` (image tokens only)
and ``main`` (the joint sequence). Every attention has separate ``q_norm``/``k_norm`` RMSNorms on
``(B, L, H, D)`` and no ``attn1_patch``, so SafeRoPE object-patches the norms. Keys may have fewer
heads than queries (``n_kv_heads``, grouped-query attention).

ComfyUI ``comfy.model_base.Lumina2`` with a ``comfy.supported_models.ZImage`` config (plain Lumina 2
shares the class and is not covered): main layers see ``[text, image]``; the text length (captions
are padded to a multiple of a block size) is the length the last context refiner saw.
diffusers ``ZImageTransformer2DModel`` (keys always have as many heads as queries there): main
layers see ``[image, text]`` in text-to-image mode, and the image length is what the last noise
refiner saw. Its "omni" mode (nested lists of images, ``[text, image, siglip]``) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedModelError
from . import Arch, ComfySpec, DiffusersSpec, HostKind, Kind, Length, NormSite


def _comfy(stream: str) -> tuple[NormSite, NormSite]:
    return (NormSite("attention.q_norm", "q", stream, "BLHD"), NormSite("attention.k_norm", "k", stream, "BLHD"))


def _diffusers(stream: str) -> tuple[NormSite, NormSite]:
    return (NormSite("attention.norm_q", "q", stream, "BLHD"), NormSite("attention.norm_k", "k", stream, "BLHD"))


def _refuse_omni(args: tuple, kwargs: Mapping[str, Any]) -> None:
    x = kwargs.get("x", args[0] if args else None)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple)):
        raise UnsupportedModelError("SafeRoPE: Z-Image's omni mode (nested image lists, [text, image, siglip] "
                                    "sequences) is not supported in diffusers; use text-to-image mode")


_C = ("JointTransformerBlock",)
_D = ("ZImageTransformerBlock",)

ARCH = Arch(
    id="z_image", name="Z-Image",
    kinds=(Kind("context_refiner", ("txt",)), Kind("noise_refiner", ("img",)), Kind("main")),
    comfy=ComfySpec(model_classes=("Lumina2",), config_classes=("ZImage",), kinds=(
        HostKind("context_refiner", "context_refiner", _C, _comfy("txt"), "attention.n_local_heads",
                 kv_heads="attention.n_local_kv_heads"),
        HostKind("noise_refiner", "noise_refiner", _C, _comfy("img"), "attention.n_local_heads",
                 kv_heads="attention.n_local_kv_heads"),
        HostKind("main", "layers", _C, _comfy("joint"), "attention.n_local_heads", kv_heads="attention.n_local_kv_heads",
                 length=Length("probe", "txt", kind="context_refiner", site="attention.q_norm")))),
    diffusers=DiffusersSpec(
        transformer_classes=("ZImageTransformer2DModel",), pipeline_classes=("ZImagePipeline",),
        text_to_image=("ZImagePipeline",),
        check_call=_refuse_omni,
        kinds=(
            HostKind("context_refiner", "context_refiner", _D, _diffusers("txt"), "attention.heads"),
            HostKind("noise_refiner", "noise_refiner", _D, _diffusers("img"), "attention.heads"),
            HostKind("main", "layers", _D, _diffusers("joint"), "attention.heads", order="img_first",
                     length=Length("probe", "img", kind="noise_refiner", site="attention.norm_q")))),
    models="Z-Image Turbo/Base: 2 context refiner + 2 noise refiner + 30 main layers, 30 heads × 128",
    gqa=True,
)

"""FLUX.1 (dev, schnell, Kontext, Krea, Fill): 19 double + 38 single blocks, 24 heads × 128.

ComfyUI ``comfy.model_base.Flux`` (Kontext/Fill use the same class; Kontext reference-image tokens
follow the image tokens and count as image); diffusers ``FluxTransformer2DModel``.
"""

from __future__ import annotations

from . import Arch, ComfySpec, DiffusersSpec, HostKind, Kind
from ._flux import BLOCK_TEXT, COMFY_DOUBLE, COMFY_SINGLE, DIFFUSERS_DOUBLE_NORMS, DIFFUSERS_JOINT_NORMS

ARCH = Arch(
    id="flux1", name="FLUX.1",
    kinds=(Kind("double"), Kind("single")),
    comfy=ComfySpec(model_classes=("Flux",), kinds=(COMFY_DOUBLE, COMFY_SINGLE)),
    diffusers=DiffusersSpec(
        transformer_classes=("FluxTransformer2DModel",),
        pipeline_classes=("FluxPipeline", "FluxKontextPipeline", "FluxImg2ImgPipeline"),
        text_to_image=("FluxPipeline",),
        kinds=(HostKind("double", "transformer_blocks", ("FluxTransformerBlock",), DIFFUSERS_DOUBLE_NORMS, "attn.heads"),
               HostKind("single", "single_transformer_blocks", ("FluxSingleTransformerBlock",), DIFFUSERS_JOINT_NORMS,
                        "attn.heads", length=BLOCK_TEXT))),
    models="FLUX.1 dev/schnell/Kontext/Krea: 19 double + 38 single blocks, 24 heads × 128",
)

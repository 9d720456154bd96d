"""Flux.2 (dev, Klein 4B/9B): the FLUX.1 block classes with other sizes (dev: 8 double + 48 single, 48 heads × 128).

ComfyUI ``comfy.model_base.Flux2`` (same ``comfy.ldm.flux`` blocks as FLUX.1 — only the class tells
them apart, so a FLUX.1 adapter of equal shapes is still refused); diffusers
``Flux2Transformer2DModel``, whose single blocks get the joint sequence without the text stream.
"""

from __future__ import annotations

from . import Arch, ComfySpec, DiffusersSpec, HostKind, Kind
from ._flux import COMFY_DOUBLE, COMFY_SINGLE, DIFFUSERS_DOUBLE_NORMS, DIFFUSERS_JOINT_NORMS, MODEL_TEXT

ARCH = Arch(
    id="flux2", name="Flux.2",
    kinds=(Kind("double"), Kind("single")),
    comfy=ComfySpec(model_classes=("Flux2",), kinds=(COMFY_DOUBLE, COMFY_SINGLE)),
    diffusers=DiffusersSpec(
        transformer_classes=("Flux2Transformer2DModel",),
        pipeline_classes=("Flux2Pipeline", "Flux2KleinPipeline"), text_to_image=("Flux2Pipeline", "Flux2KleinPipeline"),
        kinds=(HostKind("double", "transformer_blocks", ("Flux2TransformerBlock",), DIFFUSERS_DOUBLE_NORMS, "attn.heads"),
               HostKind("single", "single_transformer_blocks", ("Flux2SingleTransformerBlock",), DIFFUSERS_JOINT_NORMS,
                        "attn.heads", length=MODEL_TEXT))),
    models="Flux.2 dev: 8 double + 48 single blocks, 48 heads × 128; Klein 4B/9B: fewer blocks and heads",
)

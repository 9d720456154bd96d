"""Chroma and Chroma Radiance: FLUX.1's blocks without modulation (19 double + 38 single, 24 heads × 128).

ComfyUI ``comfy.model_base.Chroma`` / ``ChromaRadiance`` (``comfy.ldm.chroma`` on the Flux blocks);
diffusers ``ChromaTransformer2DModel``, whose single blocks get the joint sequence only.
"""

from __future__ import annotations

from . import Arch, ComfySpec, DiffusersSpec, HostKind, Kind
from ._flux import COMFY_DOUBLE, COMFY_SINGLE, DIFFUSERS_DOUBLE_NORMS, DIFFUSERS_JOINT_NORMS, MODEL_TEXT

ARCH = Arch(
    id="chroma", name="Chroma",
    kinds=(Kind("double"), Kind("single")),
    comfy=ComfySpec(model_classes=("Chroma", "ChromaRadiance"), kinds=(COMFY_DOUBLE, COMFY_SINGLE)),
    diffusers=DiffusersSpec(
        transformer_classes=("ChromaTransformer2DModel",),
        pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"), text_to_image=("ChromaPipeline",),
        kinds=(HostKind("double", "transformer_blocks", ("ChromaTransformerBlock",), DIFFUSERS_DOUBLE_NORMS, "attn.heads"),
               HostKind("single", "single_transformer_blocks", ("ChromaSingleTransformerBlock",), DIFFUSERS_JOINT_NORMS,
                        "attn.heads", length=MODEL_TEXT))),
    models="Chroma / Chroma Radiance: 19 double + 38 single blocks, 24 heads × 128",
)

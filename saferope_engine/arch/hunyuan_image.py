"""HunyuanImage 2.1: Flux-style double and single blocks (20 double + 40 single, 28 heads × 128).

ComfyUI ``comfy.model_base.HunyuanImage21`` (``comfy.ldm.hunyuan_video`` on the Flux blocks; byT5
glyph tokens are part of the text stream): the single blocks see ``[text, image]`` from ComfyUI 0.14
on, and ``[image, text]`` before (0.3.64 builds the double blocks with ``flipped_img_txt=True`` and
joins the streams image first; the pack reads that flag off the model). diffusers
``HunyuanImageTransformer2DModel``, whose single blocks put the image tokens *first* too.
"""

from __future__ import annotations

from dataclasses import replace

from . import Arch, ComfySpec, DiffusersSpec, HostKind, Kind
from ._flux import BLOCK_TEXT, COMFY_DOUBLE, COMFY_SINGLE, DIFFUSERS_DOUBLE_NORMS, DIFFUSERS_JOINT_NORMS

ARCH = Arch(
    id="hunyuan_image", name="HunyuanImage 2.1",
    kinds=(Kind("double"), Kind("single")),
    comfy=ComfySpec(model_classes=("HunyuanImage21",), kinds=(
        COMFY_DOUBLE, replace(COMFY_SINGLE, flip="double_blocks.0.flipped_img_txt"))),
    diffusers=DiffusersSpec(
        transformer_classes=("HunyuanImageTransformer2DModel",),
        pipeline_classes=("HunyuanImagePipeline",), text_to_image=("HunyuanImagePipeline",),
        kinds=(HostKind("double", "transformer_blocks", ("HunyuanImageTransformerBlock",), DIFFUSERS_DOUBLE_NORMS,
                        "attn.heads"),
               HostKind("single", "single_transformer_blocks", ("HunyuanImageSingleTransformerBlock",),
                        DIFFUSERS_JOINT_NORMS, "attn.heads", order="img_first", length=BLOCK_TEXT))),
    models="HunyuanImage 2.1: 20 double + 40 single blocks, 28 heads × 128 (read from the weights)",
)

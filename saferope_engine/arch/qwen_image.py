"""Qwen-Image and Qwen-Image-Edit: 60 joint ("double") blocks, 24 heads × 128.

Each block normalises the image stream (``attn.norm_q``/``norm_k``) and the text stream
(``attn.norm_added_q``/``norm_added_k``) separately, one RMSNorm per q and k, then joins them text
first. ComfyUI ``comfy.model_base.QwenImage`` (``comfy.ldm.qwen_image``): ``(B, H, L, D)`` at the norms
from 0.20 (``(B, L, H, D)`` in 0.3.64: the pack reads the head axis off the tensors), and from 0.20
the attention calls ``attn1_patch`` with the joint q/k (``block_type`` "double", ``img_slice``);
diffusers ``QwenImageTransformer2DModel``: ``(B, L, H, D)``. Edit models' reference images are
image tokens.
"""

from __future__ import annotations

from . import Arch, ComfySpec, DiffusersSpec, HostKind, Kind, NormSite

_COMFY_NORMS = (NormSite("attn.norm_added_q", "q", "txt"), NormSite("attn.norm_added_k", "k", "txt"),
                NormSite("attn.norm_q", "q", "img"), NormSite("attn.norm_k", "k", "img"))
_DIFFUSERS_NORMS = tuple(NormSite(n.path, n.which, n.stream, "BLHD") for n in _COMFY_NORMS)

ARCH = Arch(
    id="qwen_image", name="Qwen-Image",
    kinds=(Kind("double"),),
    comfy=ComfySpec(model_classes=("QwenImage",), kinds=(
        HostKind("double", "transformer_blocks", ("QwenImageTransformerBlock",), _COMFY_NORMS, "attn.heads",
                 attn1=("double", "attn")),)),
    diffusers=DiffusersSpec(
        transformer_classes=("QwenImageTransformer2DModel",),
        pipeline_classes=("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
        text_to_image=("QwenImagePipeline",),
        kinds=(HostKind("double", "transformer_blocks", ("QwenImageTransformerBlock",), _DIFFUSERS_NORMS, "attn.heads"),)),
    models="Qwen-Image / Qwen-Image-Edit: 60 blocks, 24 heads × 128",
)

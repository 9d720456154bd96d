"""Hook sites of the Flux-style blocks that several families share.

ComfyUI: ``comfy.ldm.flux.layers`` ``DoubleStreamBlock`` / ``SingleStreamBlock`` (FLUX.1, Flux.2,
Chroma and HunyuanImage 2.1 all use them). Each block's ``QKNorm`` (``forward(q, k, v) -> (q, k)``,
``(B, H, L, D)``) produces the pre-RoPE vectors: a double block has one per stream, a single block
one for the joint ``[text, image]`` sequence. From ComfyUI 0.17 both blocks also call
``attn1_patch`` with the joint text-first q/k right after it. In object-patch mode the single
blocks' split is the text length seen by the last double block's text norm.

diffusers: ``attn.norm_q``/``norm_k`` (image stream, or the joint sequence in single blocks) and
``attn.norm_added_q``/``norm_added_k`` (text stream), ``torch.nn.RMSNorm`` on ``(B, L, H, D)``.
"""

from __future__ import annotations

from . import HostKind, Length, NormSite

COMFY_DOUBLE = HostKind(
    kind="double", blocks="double_blocks", block_classes=("DoubleStreamBlock",),
    norms=(NormSite("txt_attn.norm", "qk", "txt"), NormSite("img_attn.norm", "qk", "img")),
    heads="num_heads", attn1=("double", ""))
COMFY_SINGLE = HostKind(
    kind="single", blocks="single_blocks", block_classes=("SingleStreamBlock",),
    norms=(NormSite("norm", "qk", "joint"),), heads="num_heads",
    length=Length("probe", "txt", kind="double", site="txt_attn.norm"), attn1=("single", ""))

#: diffusers double-block norms: text stream (added) and image stream, one module per q and k.
DIFFUSERS_DOUBLE_NORMS = (
    NormSite("attn.norm_added_q", "q", "txt", "BLHD"), NormSite("attn.norm_added_k", "k", "txt", "BLHD"),
    NormSite("attn.norm_q", "q", "img", "BLHD"), NormSite("attn.norm_k", "k", "img", "BLHD"),
)
#: diffusers single-block norms: the joint sequence.
DIFFUSERS_JOINT_NORMS = (NormSite("attn.norm_q", "q", "joint", "BLHD"), NormSite("attn.norm_k", "k", "joint", "BLHD"))

#: Text length of a call from the transformer's ``encoder_hidden_states`` argument (B, T, C).
MODEL_TEXT = Length("model_arg", "txt", arg="encoder_hidden_states", index=1)
#: Text length from the block's ``encoder_hidden_states`` argument (re-read when a block re-runs
#: under gradient checkpointing).
BLOCK_TEXT = Length("block_arg", "txt", arg="encoder_hidden_states", index=1)

"""A tiny FLUX for tests, the same weights in diffusers and ComfyUI layout, and synthetic prompts.

Runs inside a ComfyUI process (imports ``comfy`` lazily). Sizes follow the constraints of
ComfyUI's Flux loader: head dim 128 (heads are inferred as hidden/128 from 0.9 on, and the RoPE
axes are fixed at 16+56+56 = 128), 16 latent channels, patch size 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyFluxSpec:
    heads: int = 2
    head_dim: int = 128
    depth: int = 2
    depth_single: int = 2
    context_dim: int = 64
    pooled_dim: int = 32

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def diffusers_model(spec: TinyFluxSpec, seed: int = 0):
    """A randomly initialised diffusers ``FluxTransformer2DModel`` (float32, eval mode)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=spec.depth, num_single_layers=spec.depth_single,
        attention_head_dim=spec.head_dim, num_attention_heads=spec.heads, joint_attention_dim=spec.context_dim,
        pooled_projection_dim=spec.pooled_dim, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return model.eval()


def diffusers_to_comfy(sd: dict, spec: TinyFluxSpec) -> dict:
    """Diffusers state dict -> ComfyUI Flux keys, with ComfyUI's own key map (``comfy.utils.flux_to_diffusers``)."""
    import comfy.utils

    key_map = comfy.utils.flux_to_diffusers(
        {"depth": spec.depth, "depth_single_blocks": spec.depth_single, "hidden_size": spec.hidden})
    out: dict = {}
    fused: dict = {}
    for name, value in sd.items():
        target = key_map[name]
        if isinstance(target, str):
            out[target] = value.clone()
        elif target[1] is None:  # (comfy_key, None, fn): a converted copy (scale/shift swap)
            out[target[0]] = target[2](value.clone())
        else:  # (comfy_key, (dim, start, size)): a slice of a fused qkv(+mlp) weight
            fused.setdefault(target[0], []).append((target[1][1], value))
    for name, pieces in fused.items():
        out[name] = torch.cat([v for _, v in sorted(pieces, key=lambda p: p[0])], dim=0).clone()
    return out


def load_tiny_flux(sd: dict, dtype: torch.dtype | None = None, custom_operations=None):
    """A ModelPatcher for ComfyUI-layout weights: ComfyUI's loader when it infers the shapes
    correctly (0.9+), else the model built from the detected config with the sizes read off the
    tensors (older versions hard-code FLUX.1's 3072 hidden/24 heads). ``custom_operations`` are
    the ``comfy.ops`` replacement both paths hand to the model (as ``model_options`` of
    ``load_diffusion_model_state_dict``; e.g. ComfyUI-GGUF's ``GGMLOps``). Returns ``(patcher, how)``."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    sd = dict(sd)  # ComfyUI's loaders pop keys from the dict they are given
    hidden, context = int(sd["img_in.weight"].shape[0]), int(sd["txt_in.weight"].shape[1])
    head_dim = int(next(v for k, v in sd.items() if k.startswith("double_blocks.0.img_attn.norm.query_norm")).shape[0])
    options = {k: v for k, v in (("dtype", dtype), ("custom_operations", custom_operations)) if v is not None}
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options)
        dm = patcher.model.diffusion_model if patcher is not None else None
        if dm is not None and dm.hidden_size == hidden and dm.num_heads == hidden // head_dim:
            return patcher, "loader"
    except Exception as e:  # noqa: BLE001 - older loaders build FLUX.1-sized modules and fail to load
        logger.info("tiny flux: ComfyUI's loader cannot load it (%s); building it from the config", type(e).__name__)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    cfg.update(hidden_size=hidden, num_heads=hidden // head_dim, context_in_dim=context)
    model_config = comfy.model_detection.model_config_from_unet_config(cfg, sd)
    load_device = comfy.model_management.get_torch_device()
    unet_dtype = dtype or comfy.model_management.unet_dtype(
        model_params=sum(v.numel() for v in sd.values()), supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    if custom_operations is not None:
        model_config.custom_operations = custom_operations
    model = model_config.get_model(sd, "")
    model.load_model_weights(dict(sd), "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, "config"


def concept_vector(dim: int) -> torch.Tensor:
    """The synthetic "unsafe concept" direction in text-embedding space (fixed)."""
    g = torch.Generator().manual_seed(4242)
    v = torch.randn(dim, generator=g)
    return v / v.norm() * dim ** 0.5


def conditioning(seed: int, length: int, *, concept: float = 0.0, triggers: int = 0, spec: TinyFluxSpec = TinyFluxSpec(),
                 guidance: float = 3.5, extra: dict | None = None) -> list:
    """A CONDITIONING like CLIPTextEncode + FluxGuidance produce, from random "text embeddings".

    ``triggers`` tokens after the first carry the concept direction scaled by ``concept``: the
    "unsafe words" of the prompt. ``concept = 0`` is a benign prompt.
    """
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, length, spec.context_dim, generator=g)  # (1, L, C)
    pooled = torch.randn(1, spec.pooled_dim, generator=g)
    if concept and triggers:
        n = min(triggers, length - 1)
        ctx[0, 1:1 + n] = 0.3 * ctx[0, 1:1 + n] + concept * concept_vector(spec.context_dim)
    opts = {"pooled_output": pooled, "guidance": guidance}
    opts.update(extra or {})
    return [[ctx, opts]]

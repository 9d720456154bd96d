"""Test-only ComfyUI nodes: a tiny FLUX loader and synthetic conditionings (no weights to download).

Loaded through ComfyUI's custom-node loader next to the SafeRoPE pack by the ComfyUI-backed tests
(never shipped: it lives under tests/). Ids carry the ``SafeRoPETest`` prefix.
"""

from __future__ import annotations

import torch

from .tinyflux import TinyFluxSpec, conditioning, load_tiny_flux

_DTYPES = {"default": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3fn": torch.float8_e4m3fn,
           "float8_e5m2": torch.float8_e5m2}


class SafeRoPETestTinyFlux:
    CATEGORY = "SafeRoPE/testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "ComfyUI-layout tiny Flux .safetensors"}),
                             "weight_dtype": (list(_DTYPES), {"tooltip": "dtype of the weights"})}}

    def load(self, path, weight_dtype):
        import comfy.utils

        patcher, _ = load_tiny_flux(comfy.utils.load_torch_file(path, safe_load=True), _DTYPES[weight_dtype])
        return (patcher,)


class SafeRoPETestConditioning:
    CATEGORY = "SafeRoPE/testing"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "length": ("INT", {"default": 8, "min": 1, "max": 4096}),
                             "concept": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0}),
                             "triggers": ("INT", {"default": 0, "min": 0, "max": 4096}),
                             "context_dim": ("INT", {"default": TinyFluxSpec().context_dim, "min": 1, "max": 8192}),
                             "pooled_dim": ("INT", {"default": TinyFluxSpec().pooled_dim, "min": 1, "max": 8192})}}

    def make(self, seed, length, concept, triggers, context_dim, pooled_dim):
        spec = TinyFluxSpec(context_dim=context_dim, pooled_dim=pooled_dim)
        return (conditioning(seed, length, concept=concept, triggers=triggers, spec=spec),)


NODE_CLASS_MAPPINGS = {"SafeRoPETestTinyFlux": SafeRoPETestTinyFlux, "SafeRoPETestConditioning": SafeRoPETestConditioning}

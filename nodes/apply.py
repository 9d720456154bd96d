"""Node "Apply SafeRoPE to Model" (``SafeRoPEApply``)."""

from __future__ import annotations

from typing import Any

from ..saferope_engine import SafeRoPEAdapter
from .install import apply_saferope
from .loader import ADAPTER_TYPE


class SafeRoPEApply:
    """Returns a clone of the MODEL that applies the adapter between QK-norm and RoPE.

    The incoming MODEL is not modified. Chaining two Apply nodes applies both adapters, in
    order. An adapter built for other head counts/dims/block counts is rejected here, before
    sampling; during sampling a hook that did not run raises instead of producing an
    unprotected image.
    """

    DESCRIPTION = ("Protects a FLUX model with a SafeRoPE adapter: risky text/image tokens are rotated "
                   "inside the unsafe subspace of safety-critical attention heads. Safe prompts pass unchanged.")
    CATEGORY = "SafeRoPE"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A protected copy of the model; connect it to the sampler instead of the original.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The FLUX model to protect (from Load Diffusion Model, optionally after "
                                           "LoRAs). It is not modified: the node works on a clone."}),
            "adapter": (ADAPTER_TYPE, {"tooltip": "The adapter from 'Load SafeRoPE Adapter'. It must match the "
                                                  "model's heads, head size and block counts."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "Rotation strength α: 1 = as trained, 0 = off (output equals the "
                                              "unprotected model), above 1 = stronger suppression."}),
            "threshold": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 0.999, "step": 0.01,
                                    "tooltip": "Latent Risk Score above which a token is rotated. -1 (any negative "
                                               "value) = the adapter's own threshold. Lower = stricter, more false "
                                               "positives; higher = more permissive."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Where in sampling protection starts (0 = first step, highest "
                                                   "noise). Converted to a sigma like ControlNet's start_percent."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Where in sampling protection ends (1 = last step). Outside "
                                                 "[start, end] the model runs unprotected on purpose."}),
        }}

    def apply(self, model: Any, adapter: SafeRoPEAdapter, strength: float, threshold: float,
              start_percent: float, end_percent: float) -> tuple[Any]:
        tau = None if threshold < 0 else float(threshold)
        if tau is not None and tau >= 1.0:
            raise ValueError(f"threshold must be below 1 (or negative for the adapter's own), got {threshold}")
        return (apply_saferope(model, adapter, strength=strength, threshold=tau,
                               start_percent=start_percent, end_percent=end_percent),)

"""Direct calls of the FLUX transformer, built the way diffusers' FluxPipeline builds them.

Latents are packed 2×2 patches ``(B, (h/2)·(w/2), 4·c)``; image ids hold (0, row, col) of each
patch, text ids are zeros; the timestep is the noise level σ ∈ (0, 1]; the guidance embedding
(FLUX.1-dev) gets the configured scale. The flow-matching convention is
``x_σ = (1 − σ)·x₀ + σ·ε`` with velocity ``v = ε − x₀``, so an Euler step from σ to σ' is
``x ← x + (σ' − σ)·v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .text import TextBatch
from .models import ModelInfo


def image_ids(rows: int, cols: int) -> Tensor:
    """``(rows·cols, 3)`` position ids (0, row, col) of the packed latent patches."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)  # (rows, cols, 3) -> (rows·cols, 3)


def pack(latents: Tensor) -> Tensor:
    """``(B, c, h, w)`` VAE latents -> ``(B, (h/2)·(w/2), 4c)`` packed tokens."""
    B, c, h, w = latents.shape
    x = latents.view(B, c, h // 2, 2, w // 2, 2)  # split into 2×2 patches
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, c, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), c * 4)


@dataclass
class FluxCaller:
    """Calls ``transformer`` on packed latents for a fixed image size."""

    transformer: torch.nn.Module
    info: ModelInfo
    height: int
    width: int
    guidance: float
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        f = self.info.vae_scale_factor
        self.lat_h, self.lat_w = 2 * (self.height // (f * 2)), 2 * (self.width // (f * 2))
        self.seq_len = (self.lat_h // 2) * (self.lat_w // 2)
        self.channels = self.info.in_channels
        self.img_ids = image_ids(self.lat_h // 2, self.lat_w // 2).to(self.device, self.dtype)

    def from_vae(self, latents: Tensor) -> Tensor:
        """``(B, c, h, w)`` normalised VAE latents -> the transformer's input ``(B, seq, 4c)``."""
        return pack(latents)

    def noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """``(B, seq, C)`` standard normal packed latents (drawn on the CPU: device-independent)."""
        x = torch.randn(batch, self.seq_len, self.channels, generator=generator)
        return x.to(self.device, self.dtype)

    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        """Predicted velocity ``(B, seq, C)`` at noise level ``sigma`` ``(B,)``."""
        B = x.shape[0]
        guidance = (torch.full((B,), self.guidance, device=self.device, dtype=torch.float32)
                    if self.info.guidance_embeds else None)
        txt_ids = torch.zeros(text.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        out = self.transformer(hidden_states=x, timestep=sigma.to(self.device, self.dtype), guidance=guidance,
                               pooled_projections=text.pooled, encoder_hidden_states=text.embeds,
                               txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        return out

    def rollout(self, x1: Tensor, text: TextBatch, sigma: float, steps: int) -> Tensor:
        """Euler-integrate from pure noise ``x1`` (σ = 1) down to ``sigma`` on the grid ``k/steps``.

        The caller decides which model runs (e.g. inside ``handle.bypassed()`` for the base model).
        """
        x = x1
        k = steps
        with torch.no_grad():
            while k / steps > sigma + 1e-9:
                s, s_next = k / steps, (k - 1) / steps
                v = self.velocity(x, torch.full((x.shape[0],), s), text)
                x = x + (s_next - s) * v
                k -= 1
        return x

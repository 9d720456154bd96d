"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL text encoder, ``QwenImageTransformer2DModel``, its video-style VAE.

Text: ``QwenImagePipeline.encode_prompt`` wraps the prompt in its chat template, runs Qwen2.5-VL
with the attention mask, drops the template's leading tokens and keeps only the real tokens of
each prompt, padded to the batch's longest — so lengths vary from call to call — with a mask
(``None`` when every token is real). The transformer masks the padding out of attention (text
positions of RoPE do not depend on it), so batches are cut to their longest prompt.

Transformer call, as the pipeline builds it: the VAE's ``(B, z, 1, h, w)`` latents normalised by
its ``latents_mean``/``latents_std``, packed into 2×2 patches ``(B, (h/2)·(w/2), 4z)``;
``img_shapes`` = ``(1, h/2, w/2)`` per sample; the timestep is σ. Qwen-Image samples with true
classifier-free guidance (``true_cfg_scale``, an empty negative prompt); training uses the
conditional velocity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.errors import UsageError
from .base import Caller, Family, ModelInfo, TextBatch, pack_2x2


class QwenImageCaller(Caller):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        f = self.family.vae_scale_factor(self.info)
        self.img_shape = (1, self.height // (f * 2), self.width // (f * 2))  # (frames, patch rows, patch cols)

    def from_vae(self, latents: Tensor) -> Tensor:
        return pack_2x2(latents)

    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        text = text.trimmed(("embeds", "mask"), by="mask")
        B = x.shape[0]
        return self.transformer(hidden_states=x, timestep=sigma.to(self.device, self.dtype),
                                guidance=self.guidance_tensor(B), encoder_hidden_states=text.embeds,
                                encoder_hidden_states_mask=text.mask.long(), img_shapes=[[self.img_shape]] * B,
                                return_dict=False)[0]


class QwenImage(Family):
    id = "qwen_image"
    caller_class = QwenImageCaller

    def vae_scale_factor(self, info: ModelInfo) -> int:
        """The Qwen-Image VAE halves the size once per entry of its ``temperal_downsample`` list."""
        levels = info.vae_config.get("temperal_downsample")
        if not isinstance(levels, list):
            raise UsageError(f"MODEL {info.spec!r}: vae/config.json has no temperal_downsample")
        return 2 ** len(levels)

    latent_shape = Family.packed_latent_shape

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        embeds, mask = pipe.encode_prompt(prompt=list(prompts), device=device, max_sequence_length=max_len)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
        return {"embeds": embeds.cpu(), "mask": mask}

    def encode_pixels(self, vae: Any, pixels: Tensor) -> Tensor:
        """``(B, z, h, w)`` latents normalised by the VAE's ``latents_mean``/``latents_std`` (one frame)."""
        z = vae.encode(pixels[:, :, None]).latent_dist.mode()  # (B, 3, 1, H, W) -> (B, z, 1, h, w)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        return ((z - mean) / std)[:, :, 0]

    def pipeline_options(self, pipe: Any, *, guidance: float, max_len: int, batch: int) -> dict[str, Any]:
        """True classifier-free guidance (``true_cfg_scale`` with an empty negative prompt) when ``guidance > 1``."""
        out: dict[str, Any] = {"max_sequence_length": max_len, "true_cfg_scale": guidance,
                               "negative_prompt": [" "] * batch if guidance > 1 else None}
        if pipe.transformer.config.get("guidance_embeds", False):
            out["guidance_scale"] = guidance
        return out


FAMILY = QwenImage()

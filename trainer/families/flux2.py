"""Flux.2 (``Flux2Pipeline``: Mistral Small 3 text encoder; ``Flux2KleinPipeline``: Qwen3), ``Flux2Transformer2DModel``.

Text: both pipelines' ``encode_prompt`` render a chat template (Flux.2 dev with its system message),
tokenize it padded to ``max_sequence_length`` and stack three hidden layers of the language model
into ``(B, L, 3·hidden)``; the transformer attends to every one of the ``L`` tokens (no mask reaches
it). ``encode_prompt`` returns no mask, so the real tokens are the attention mask the pipeline hands
its text encoder (read by a forward pre-hook on the encoder) — whichever side the tokenizer pads.

Transformer call, as the pipelines build it: the VAE's latents in 2×2 patches ``(B, 4c, h/2, w/2)``
(normalised by the VAE's batch-norm statistics) flattened to ``(B, (h/2)·(w/2), 4c)``; image ids
``(t, row, col, l) = (0, row, col, 0)``, text ids ``(0, 0, 0, position)``; the timestep is σ; the
guidance embedding (Flux.2 dev) gets the configured scale, Klein has none (it samples with
classifier-free guidance; training uses the conditional velocity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .base import Caller, Family, TextBatch, grid_ids


def patchify(latents: Tensor) -> Tensor:
    """``(B, c, h, w)`` VAE latents -> ``(B, 4c, h/2, w/2)``: each 2×2 patch's cells become channels (c-major)."""
    B, c, h, w = latents.shape
    x = latents.reshape(B, c, h // 2, 2, w // 2, 2)  # split into 2×2 patches
    x = x.permute(0, 1, 3, 5, 2, 4)  # (B, c, 2, 2, h/2, w/2)
    return x.reshape(B, c * 4, h // 2, w // 2)


def flatten(latents: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h·w, C)`` tokens, row-major."""
    B, C, h, w = latents.shape
    return latents.reshape(B, C, h * w).permute(0, 2, 1)  # (B, C, h·w) -> (B, h·w, C)


@contextlib.contextmanager
def captured_attention_mask(encoder: torch.nn.Module) -> Iterator[list[Tensor]]:
    """The ``attention_mask`` argument of every call of ``encoder`` inside the block, in call order."""
    seen: list[Tensor] = []

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None:
            seen.append(mask.detach().bool().cpu())

    handle = encoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


class Flux2Caller(Caller):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        f = self.family.vae_scale_factor(self.info)
        rows, cols = self.height // (f * 2), self.width // (f * 2)  # latent patches per side
        self.img_ids = grid_ids(rows, cols, 4, 1, 2).long().to(self.device)  # (seq, 4): (0, row, col, 0), int64 as the pipeline's

    def from_vae(self, latents: Tensor) -> Tensor:
        """``(B, 4c, h/2, w/2)`` normalised patchified latents -> ``(B, seq, 4c)``."""
        return flatten(latents)

    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        B, L = text.embeds.shape[:2]
        txt_ids = torch.zeros(L, 4, dtype=torch.long, device=self.device)
        txt_ids[:, 3] = torch.arange(L, device=self.device)  # (0, 0, 0, position)
        return self.transformer(hidden_states=x, timestep=sigma.to(self.device, self.dtype),
                                guidance=self.guidance_tensor(B), encoder_hidden_states=text.embeds,
                                txt_ids=txt_ids.expand(B, -1, -1), img_ids=self.img_ids.expand(B, -1, -1),
                                return_dict=False)[0]


class Flux2(Family):
    id = "flux2"
    caller_class = Flux2Caller

    latent_shape = Family.packed_latent_shape

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        with captured_attention_mask(pipe.text_encoder) as masks:
            embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=device, max_sequence_length=max_len)
        if len(masks) != 1 or tuple(masks[0].shape) != tuple(embeds.shape[:2]):
            raise RuntimeError(f"{type(pipe).__name__}: expected one text-encoder call with a {tuple(embeds.shape[:2])} "
                               f"attention mask, saw {[tuple(m.shape) for m in masks]}")
        return {"embeds": embeds.cpu(), "mask": masks[0]}

    def encode_pixels(self, vae: Any, pixels: Tensor) -> Tensor:
        """Patchified latents normalised by the VAE's batch-norm statistics, ``(B, 4c, h/2, w/2)``."""
        z = patchify(vae.encode(pixels).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        return (z - mean) / std


FAMILY = Flux2()

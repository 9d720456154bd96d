"""Z-Image (``ZImagePipeline``): Qwen3 text encoder, ``ZImageTransformer2DModel`` (a single-stream DiT), FLUX.1's VAE.

Text: ``ZImagePipeline.encode_prompt`` renders the prompt in the tokenizer's chat template, pads it
to ``max_sequence_length``, runs Qwen3 with the mask and returns, per prompt, only the real tokens'
states (second-to-last layer): a list of ``(n_i, C)``. They are cached padded, with a mask; the
transformer gets the list back. It pads each caption to a multiple of 32 with a learned token and
the batch to its longest, so at every site the real tokens lead each row's text
(:meth:`Family.site_mask` counts them).

Transformer call, as the pipeline builds it: a list of ``(c, 1, h, w)`` latents (the VAE's
``(z − shift)·scale``), the timestep ``1 − σ``, the caption list; the model predicts ``−v``, so the
velocity is its output negated. Z-Image samples with classifier-free guidance (``guidance_scale``;
Turbo with none); training uses the conditional velocity. The image tokens a main layer sees are
padded to a multiple of 32 too: collecting image-token statistics counts those pad tokens when
``(H/16)·(W/16)`` is not a multiple of 32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Caller, Family, ModelInfo, TextBatch


class ZImageCaller(Caller):
    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        counts = text.mask.sum(1).tolist()
        captions = [text.embeds[b, :n] for b, n in enumerate(counts)]  # each (n_b, C): the real tokens
        latents = list(x[:, :, None].unbind(0))  # (B, c, h, w) -> B × (c, 1, h, w)
        out = self.transformer(latents, (1.0 - sigma).to(self.device, self.dtype), captions, return_dict=False)[0]
        return -torch.stack(out)[:, :, 0]  # B × (c, 1, h, w) -> (B, c, h, w); the model predicts −v


class ZImage(Family):
    id = "z_image"
    caller_class = ZImageCaller
    # the kinds that see text tokens (noise_refiner sees only the image)
    defaults = {"select": {"kinds": ["context_refiner", "main"]}}

    def patch_size(self, info: ModelInfo) -> int:
        sizes = info.transformer_config.get("all_patch_size", [2])
        return int(sizes[0] if isinstance(sizes, list) else sizes)

    def latent_shape(self, info: ModelInfo, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor(info)
        return (int(info.transformer_config["in_channels"]), height // f, width // f)

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        # a copy: ZImagePipeline writes the templated prompts into the list it is given
        states = pipe.encode_prompt(prompt=list(prompts), device=device, do_classifier_free_guidance=False,
                                    max_sequence_length=max_len)[0]
        L = max(1, max(s.shape[0] for s in states))
        embeds = torch.zeros(len(states), L, states[0].shape[-1], dtype=states[0].dtype)
        mask = torch.zeros(len(states), L, dtype=torch.bool)
        for b, s in enumerate(states):  # real tokens first, zeros after
            embeds[b, :s.shape[0]] = s.cpu()
            mask[b, :s.shape[0]] = True
        return {"embeds": embeds, "mask": mask}


FAMILY = ZImage()

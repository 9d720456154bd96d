"""Chroma (``ChromaPipeline``): one T5 text encoder, ``ChromaTransformer2DModel``, FLUX.1's VAE and packing.

Text: ``ChromaPipeline.encode_prompt`` gives T5's ``(B, L, C)`` states padded to
``max_sequence_length`` (T5 runs with the attention mask) and an attention mask that keeps the real
tokens and the first padding token (Chroma's convention); the transformer gets that mask extended
over the image tokens. The real tokens (statistics) are those of the T5 tokenizer's mask; batches
are cut to their longest masked prompt (the rest is masked out of attention anyway).

Transformer call: FLUX.1's packed latents and ids, the timestep is σ, no pooled text and no
guidance embedding (Chroma samples with classifier-free guidance; training uses the conditional
velocity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import Family, ModelInfo, TextBatch, checkpoint_call
from .flux1 import Flux1, FluxCaller, t5_limit


class ChromaCaller(FluxCaller):
    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        text = text.trimmed(("embeds", "mask", "attn"), by="attn")
        B, L = text.embeds.shape[:2]
        txt_ids = torch.zeros(L, 3, device=self.device, dtype=self.dtype)
        image = torch.ones(B, x.shape[1], dtype=torch.bool, device=self.device)
        attention_mask = torch.cat([text["attn"].bool(), image], dim=1)  # (B, L_txt + L_img)
        return self.transformer(hidden_states=x, timestep=sigma.to(self.device, self.dtype),
                                encoder_hidden_states=text.embeds, txt_ids=txt_ids, img_ids=self.img_ids,
                                attention_mask=attention_mask, return_dict=False)[0]


class Chroma(Family):
    id = "chroma"
    caller_class = ChromaCaller
    latent_shape = Flux1.latent_shape

    def text_limit(self, info: ModelInfo) -> int:
        return t5_limit(info, "tokenizer", "text_encoder")

    text_cap = text_limit

    def enable_gradient_checkpointing(self, transformer: torch.nn.Module) -> Callable[[], None]:
        """Checkpointing that keeps the attention mask of the single blocks.

        Under gradient checkpointing ``ChromaTransformer2DModel`` (diffusers 0.42) calls its single
        blocks without the attention mask it gives them otherwise, so they would attend to the
        padding while training and not while generating. The mask of the current call (a forward
        pre-hook reads it) is handed to every single block called without one.
        """
        current: dict[str, Tensor | None] = {}

        def remember(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            current["mask"] = kwargs.get("attention_mask")

        hook = transformer.register_forward_pre_hook(remember, with_kwargs=True)
        single = tuple({type(b) for b in transformer.single_transformer_blocks})

        def call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            # (hidden_states, temb, image_rotary_emb) is what diffusers passes; the mask would be the 4th
            if isinstance(module, single) and len(args) < 4 and "attention_mask" not in kwargs:
                kwargs["attention_mask"] = current.get("mask")
            return checkpoint_call(module, *args, **kwargs)

        transformer.enable_gradient_checkpointing(call)

        def undo() -> None:
            hook.remove()
            transformer.disable_gradient_checkpointing()

        return undo

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        embeds, _, attn, *_ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False,
                                                 max_sequence_length=max_len)
        tok = pipe.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        return {"embeds": embeds.cpu(), "mask": tok.attention_mask.bool(), "attn": attn.bool().cpu()}


FAMILY = Chroma()

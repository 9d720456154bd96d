"""FLUX.1 (``FluxPipeline``): CLIP-L + T5-XXL text encoders, ``FluxTransformer2DModel``, 16-channel VAE.

Text: ``FluxPipeline.encode_prompt(prompt, prompt_2)`` gives T5's ``(B, L, 4096)`` states padded to
``max_sequence_length`` (the transformer attends to the padding too; no mask reaches it) and CLIP's
pooled ``(B, 768)``; the real T5 tokens are those of the T5 tokenizer's attention mask at that
length (the pipeline calls T5 without one).

Transformer call, as ``FluxPipeline`` builds it: latents packed into 2×2 patches ``(B, (h/2)·(w/2),
4c)``, image ids ``(0, row, col)`` per patch, text ids zeros, the timestep is σ, and the guidance
embedding (FLUX.1-dev) gets the configured scale.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from ..core.errors import UsageError
from .base import Caller, Family, ModelInfo, TextBatch, grid_ids, pack_2x2


def t5_limit(info: ModelInfo, tokenizer: str, encoder: str) -> int:
    """A T5 encoder's text limit: the tokenizer's ``model_max_length``, capped by the encoder's ``n_positions``."""
    limit = 0
    for path, key in ((info.path / tokenizer / "tokenizer_config.json", "model_max_length"),
                      (info.path / encoder / "config.json", "n_positions")):
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"MODEL {info.spec!r}: cannot read {path.parent.name}/{path.name}") from None
        if isinstance(value, int) and 0 < value < 10 ** 9:  # tokenizers without a limit store a huge number
            limit = min(limit, value) if limit else value
    return limit


class FluxCaller(Caller):
    """``FluxTransformer2DModel`` on packed latents ``(B, seq, 4c)``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        f = self.family.vae_scale_factor(self.info)
        rows, cols = self.height // (f * 2), self.width // (f * 2)  # latent patches per side
        self.img_ids = grid_ids(rows, cols, 3, 1, 2).to(self.device, self.dtype)

    def from_vae(self, latents: Tensor) -> Tensor:
        """``(B, c, h, w)`` normalised VAE latents -> the transformer's input ``(B, seq, 4c)``."""
        return pack_2x2(latents)

    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        """Predicted velocity ``(B, seq, C)`` at noise level ``sigma`` ``(B,)``."""
        txt_ids = torch.zeros(text.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        return self.transformer(hidden_states=x, timestep=sigma.to(self.device, self.dtype),
                                guidance=self.guidance_tensor(x.shape[0]), pooled_projections=text["pooled"],
                                encoder_hidden_states=text.embeds, txt_ids=txt_ids, img_ids=self.img_ids,
                                return_dict=False)[0]


class Flux1(Family):
    id = "flux1"
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    caller_class = FluxCaller

    def text_limit(self, info: ModelInfo) -> int:
        return t5_limit(info, "tokenizer_2", "text_encoder_2")

    text_cap = text_limit

    def max_sequence_length(self, info: ModelInfo, requested: int) -> int:
        """T5 sequence length: ``requested`` or the tokenizer's limit (capped by the T5 config)."""
        limit = self.text_limit(info)
        if requested:
            if limit and requested > limit:
                raise UsageError(f"max_sequence_length {requested} exceeds the model's T5 limit {limit}")
            return requested
        if not limit:
            raise UsageError(f"MODEL {info.spec!r}: tokenizer_2 has no model_max_length; set max_sequence_length")
        return limit

    latent_shape = Family.packed_latent_shape

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=device,
                                               max_sequence_length=max_len)
        tok = pipe.tokenizer_2(prompts, padding="max_length", max_length=max_len, truncation=True,
                               return_tensors="pt")
        return {"embeds": embeds.cpu(), "pooled": pooled.cpu(), "mask": tok.attention_mask.bool()}


FAMILY = Flux1()

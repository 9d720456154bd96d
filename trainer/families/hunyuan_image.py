"""HunyuanImage 2.1 (``HunyuanImagePipeline``): Qwen2.5-VL + ByT5 (glyphs) text encoders, ``HunyuanImageTransformer2DModel``.

Text: ``HunyuanImagePipeline.encode_prompt`` gives Qwen2.5-VL's states of the templated prompt
(the template's leading tokens dropped) padded to the pipeline's ``tokenizer_max_length`` with
their mask, and ByT5's states of the prompt's quoted text (zeros and an empty mask when there is
none) padded to 128 bytes with theirs. The transformer joins them as ``[real ByT5, real Qwen,
padding …]`` and masks the padding out of attention, so the real text tokens lead the text stream
(:meth:`HunyuanImage.real_tokens` counts both) and batches are cut to their longest prompt.
``max_sequence_length`` sets the pipeline's ``tokenizer_max_length``.

Transformer call, as the pipeline builds it: the VAE's ``(B, c, H/r, W/r)`` latents times its
``scaling_factor`` (``r`` = ``spatial_compression_ratio``), unpacked (the transformer patchifies);
the timestep is ``1000·σ``; the guidance embedding of distilled models gets ``1000 ×`` the scale
(meanflow models get ``timestep_r = timestep``: the velocity at σ itself). The base model samples
with its guider (classifier-free guidance); training uses the conditional velocity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.errors import UsageError
from .base import Caller, Family, ModelInfo, TextBatch, default_of


class HunyuanImageCaller(Caller):
    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:
        text = text.trimmed(("embeds", "mask"), by="mask").trimmed(("embeds_2", "mask_2"), by="mask_2")
        B = x.shape[0]
        timestep = (sigma * 1000.0).to(self.device, self.dtype)
        guidance = self.guidance_tensor(B, scale=1000.0)
        return self.transformer(hidden_states=x, timestep=timestep,
                                timestep_r=timestep if self.config.get("use_meanflow", False) else None,
                                guidance=None if guidance is None else guidance.to(self.dtype),
                                encoder_hidden_states=text.embeds, encoder_attention_mask=text.mask.long(),
                                encoder_hidden_states_2=text["embeds_2"], encoder_attention_mask_2=text["mask_2"].long(),
                                return_dict=False)[0]


class HunyuanImage(Family):
    id = "hunyuan_image"
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    caller_class = HunyuanImageCaller

    def vae_scale_factor(self, info: ModelInfo) -> int:
        ratio = info.vae_config.get("spatial_compression_ratio")
        if not isinstance(ratio, int) or ratio < 1:
            raise UsageError(f"MODEL {info.spec!r}: vae/config.json has no spatial_compression_ratio")
        return ratio

    def patch_size(self, info: ModelInfo) -> int:
        patch = info.transformer_config.get("patch_size", [1, 1])
        return int(patch[0] if isinstance(patch, list) else patch)

    def text_limit(self, info: ModelInfo) -> int:
        import diffusers

        return int(default_of(getattr(diffusers, info.pipeline)._get_qwen_prompt_embeds, "tokenizer_max_length"))

    def latent_shape(self, info: ModelInfo, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor(info)
        return (int(info.transformer_config["in_channels"]), height // f, width // f)

    def real_tokens(self, text: TextBatch) -> Tensor:
        return text.mask.sum(1) + text["mask_2"].bool().sum(1)

    def site_mask(self, text: TextBatch, txt_len: int) -> Tensor:
        """The first :meth:`real_tokens` of each row: the transformer puts the real ByT5 and Qwen tokens first."""
        return TextBatch.first_tokens(self.real_tokens(text).to(text.mask.device), txt_len)

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        pipe.tokenizer_max_length = max_len  # the length encode_prompt pads Qwen2.5-VL's tokens to
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompt=list(prompts), device=device,
                                                            batch_size=len(prompts))
        return {"embeds": embeds.cpu(), "mask": mask.bool().cpu(), "embeds_2": embeds_2.cpu(),
                "mask_2": mask_2.bool().cpu()}

    def encode_pixels(self, vae: Any, pixels: Tensor) -> Tensor:
        """``(B, c, H/r, W/r)`` latents times the VAE's ``scaling_factor`` (the pipeline divides by it to decode)."""
        return vae.encode(pixels).latent_dist.mode() * float(vae.config.scaling_factor)

    def pipeline_options(self, pipe: Any, *, guidance: float, max_len: int, batch: int) -> dict[str, Any]:
        pipe.tokenizer_max_length = max_len  # HunyuanImagePipeline takes the text length as this attribute
        distilled = pipe.transformer.config.get("guidance_embeds", False)
        return {"distilled_guidance_scale": guidance if distilled else None}


FAMILY = HunyuanImage()

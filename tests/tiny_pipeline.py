"""A tiny FLUX pipeline built in code, for CPU tests (no download, no weights on disk but its own).

``build_tiny_flux(path)`` saves a diffusers folder in the FLUX.1 layout — ``transformer/``,
``text_encoder/`` + ``tokenizer/`` (CLIP), ``text_encoder_2/`` + ``tokenizer_2/`` (T5), ``vae/``,
``scheduler/`` and ``model_index.json`` — that ``FluxPipeline.from_pretrained`` loads offline.
Tokenizers are constructed locally from a word list; all weights are random with fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Words the tiny tokenizers know as whole tokens (anything else splits into letters).
WORDS = (
    "a photo of an the with and on in red green blue yellow purple circle square triangle cross "
    "zorblax quibble snarf gadget tree house dog cat car boat sky field painting drawing picture "
    "tomato brick crimson lemon grass ocean forest plain background small large bright dark"
).split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    pieces = specials + LETTERS + [f"{c}</w>" for c in LETTERS]
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        chars = list(word[:-1]) + [word[-1] + "</w>"]
        acc = chars[0]
        for nxt in chars[1:]:
            merge = (acc, nxt)
            if merge not in merges:
                merges.append(merge)
            acc += nxt
            pieces.append(acc)
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [(f"▁{w}", -1.0) for w in WORDS] + [("▁", -2.0)] + [(c, -3.0) for c in LETTERS]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=max_length)


def _token_wise_attention(transformer) -> None:
    """Make text queries/keys per-token functions of the text embedding in the first block.

    Zeroes the q/k projection biases and the adaLN shift/scale of the attention input (gates stay),
    so no direction is shared by all tokens: a concept word then has its own q/k directions, as
    a trained model's concepts do. Without this, random biases put every token in one subspace.
    """
    with torch.no_grad():
        for blk in transformer.transformer_blocks:
            for name in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                getattr(blk.attn, name).bias.zero_()
            for norm in (blk.norm1, blk.norm1_context):
                d = norm.linear.out_features // 6  # chunks: shift, scale, gate (msa), shift, scale, gate (mlp)
                norm.linear.weight[: 2 * d].zero_()
                norm.linear.bias[: 2 * d].zero_()
        for blk in transformer.single_transformer_blocks:
            for name in ("to_q", "to_k"):
                getattr(blk.attn, name).bias.zero_()
            d = blk.norm.linear.out_features // 3  # chunks: shift, scale, gate
            blk.norm.linear.weight[: 2 * d].zero_()
            blk.norm.linear.bias[: 2 * d].zero_()


def build_tiny_flux(path: str | Path, *, num_heads: int = 2, head_dim: int = 16, double: int = 2,
                    single: int = 2, text_len: int = 12, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Write a tiny random FLUX pipeline to ``path`` and return it.

    Images are 16×16 pixels: the VAE halves the resolution (latent 8×8×4), packing makes
    4×4 = 16 image tokens of 16 channels; prompts are ``text_len`` T5 tokens. The T5 encoder has
    no layers (each token's embedding is its own, context-free) and the transformer's text
    queries/keys are token-wise (see :func:`_token_wise_attention`), so concept words such as
    ``zorblax`` and ``quibble`` are separable by their q/k directions, like in a trained model.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    clip_tok = _clip_tokenizer(text_len)
    t5_tok = _t5_tokenizer(text_len)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=text_len, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=0,
                                 num_heads=4, n_positions=text_len, pad_token_id=0, eos_token_id=1))
    latent_channels = 4
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                        sample_size=16, shift_factor=0.1, scaling_factor=1.5)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4))  # RoPE axes sum to head_dim
    _token_wise_attention(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    for name, obj in (("tokenizer", clip_tok), ("tokenizer_2", t5_tok), ("text_encoder", clip),
                      ("text_encoder_2", t5), ("vae", vae), ("transformer", transformer), ("scheduler", scheduler)):
        obj.save_pretrained(path / name)
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    import json

    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path

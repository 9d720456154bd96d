"""Tiny diffusers pipelines of every model family, built in code and saved as pipeline folders (CPU tests).

Each builder writes a folder that the family's own pipeline class loads offline
(``save_pretrained``: ``model_index.json`` names every class): a tiny transformer of the family,
a tiny text encoder of the family's own class (T5 for Chroma; Mistral 3 for Flux.2, Qwen3 for
Flux.2 Klein and Z-Image; Qwen2.5-VL for Qwen-Image and, with a ByT5-tokenised T5 for glyphs,
HunyuanImage 2.1), tokenizers made here from a word list (no download), a tiny VAE of the
family's class and its scheduler. All weights are random with fixed seeds.

Two things make the made-up concept words (``zorblax``, ``quibble``) separable by their
queries/keys, as concepts are in a trained model: the language models' layers are identities
(their output projections are zero, so every token's state is its own embedding) and the
transformers' text queries/keys are token-wise functions of the text embedding where the model
allows it (:func:`token_wise`).

What is not covered by the real class: Flux.2 dev's tokenizer is a ``PixtralProcessor``, which
transformers 5 builds only with torchvision (not installed here); the tiny Flux.2 pipeline uses a
fast tokenizer with a chat template instead — the Mistral 3 text encoder, the pipeline and its
``encode_prompt`` are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tiny_pipeline import WORDS, _t5_tokenizer, build_tiny_flux

#: Chat template of the tiny Qwen tokenizers (Z-Image, Flux.2 Klein): the messages, then the assistant's turn.
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: Chat template of the tiny Mistral tokenizer (Flux.2): the user's text turn only (the system message is dropped).
MISTRAL_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST]{% for c in m['content'] %}"
                    "{{ c['text'] }}{% endfor %}[/INST]{% endif %}{% endfor %}")
#: The prompt template of Qwen-Image and HunyuanImage (their pipelines drop its leading tokens).
QWEN_PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
                        "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def qwen_tokenizer(cls_name: str = "Qwen2Tokenizer", chat: bool = False):
    """A byte-level BPE tokenizer of the Qwen classes whose merges make every word here one token.

    Trained on the words and the pipelines' prompt template, so the template's prefix takes as
    many tokens as with the real tokenizer (the pipelines drop that many).
    """
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    corpus = [QWEN_PROMPT_TEMPLATE.format(" ".join(WORDS))] + WORDS + [" " + w for w in WORDS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = getattr(transformers, cls_name)(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                                          pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])
    if chat:
        tok.chat_template = QWEN_TEMPLATE
    return tok


def same_word_embeddings(model: torch.nn.Module, tok) -> torch.nn.Module:
    """Give a word's two byte-level tokens (``red`` at a line start, ``Ġred`` after a space) one embedding, as a
    trained model knows them for one word."""
    emb = model.get_input_embeddings().weight
    vocab = tok.get_vocab()
    with torch.no_grad():
        for word in WORDS:
            if word in vocab and f"Ġ{word}" in vocab:
                emb[vocab[f"Ġ{word}"]] = emb[vocab[word]]
    return model


def mistral_tokenizer():
    """A word-level fast tokenizer with Mistral's instruction markers and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]"] + WORDS)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def identity_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every attention output and MLP down projection: each layer adds nothing, states stay the embeddings."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("o_proj", "down_proj"):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
    return model


def token_wise(transformer: torch.nn.Module) -> torch.nn.Module:
    """Zero the query/key projection biases of every attention, so no direction is shared by all tokens."""
    with torch.no_grad():
        for name, mod in transformer.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None and name.rsplit(".", 1)[-1] in (
                    "to_q", "to_k", "add_q_proj", "add_k_proj"):
                mod.bias.zero_()
    return transformer


def token_wise_modulation(transformer: torch.nn.Module) -> torch.nn.Module:
    """Zero the shift and scale of every adaLN-Zero norm in front of an attention (``AdaLayerNormZero``: chunks 1-2
    of 6; ``AdaLayerNormZeroSingle``: 1-2 of 3) and the gates of the text token refiner (HunyuanImage), so text
    queries/keys depend on their own token only — the gates of the blocks stay."""
    with torch.no_grad():
        for name, mod in transformer.named_modules():
            chunks = {"AdaLayerNormZero": 6, "AdaLayerNormZeroSingle": 3}.get(type(mod).__name__)
            if chunks and isinstance(getattr(mod, "linear", None), torch.nn.Linear):
                d = mod.linear.out_features // chunks
                mod.linear.weight[: 2 * d].zero_()
                mod.linear.bias[: 2 * d].zero_()
            if "token_refiner" in name and name.endswith("norm_out.linear"):
                mod.weight.zero_()
                mod.bias.zero_()
    return transformer


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def _kl_vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=sample_size, shift_factor=0.1,
                         scaling_factor=1.5)


def _qwen25vl(tok, layers: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)
    return same_word_embeddings(identity_layers(Qwen2_5_VLForConditionalGeneration(cfg)), tok)


def build_chroma(path: Path) -> Path:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = _t5_tokenizer(12)
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=0, num_heads=4,
                                 n_positions=12, pad_token_id=0, eos_token_id=1))
    tr = token_wise(ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(8, 4, 4), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1))
    ChromaPipeline(scheduler=_scheduler(), vae=_kl_vae(16), text_encoder=te, tokenizer=tok, transformer=tr,
                   image_encoder=None, feature_extractor=None).save_pretrained(path)
    return path


def _flux2_parts(guidance_embeds: bool, text_dim: int):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                             use_post_quant_conv=False, mid_block_add_attention=False)
    tr = token_wise(Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_dim, timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds))
    return vae, tr


def build_flux2(path: Path) -> Path:
    """Flux.2 dev's layout: Mistral 3 (30 layers: the pipeline stacks layers 10, 20 and 30), guidance embedding."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tok = mistral_tokenizer()
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=256, pad_token_id=0),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=14, image_size=56), spatial_merge_size=2)
    te = identity_layers(Mistral3ForConditionalGeneration(cfg))
    vae, tr = _flux2_parts(True, 3 * 16)
    Flux2Pipeline(scheduler=_scheduler(), vae=vae, text_encoder=te, tokenizer=tok, transformer=tr).save_pretrained(path)
    return path


def build_flux2_klein(path: Path) -> Path:
    """Flux.2 Klein's layout: Qwen3 (27 layers: the pipeline stacks layers 9, 18 and 27), no guidance embedding."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = qwen_tokenizer("Qwen2TokenizerFast", chat=True)
    te = same_word_embeddings(identity_layers(Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=tok.pad_token_id))), tok)
    vae, tr = _flux2_parts(False, 3 * 16)
    Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=te, tokenizer=tok, transformer=tr,
                       is_distilled=False).save_pretrained(path)
    return path


def build_hunyuan_image(path: Path) -> Path:
    from diffusers import AutoencoderKLHunyuanImage, HunyuanImagePipeline, HunyuanImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    te = _qwen25vl(tok, 3)  # the pipeline reads the third-to-last hidden state: the embeddings, before any norm
    with torch.no_grad():  # of a trained model's size (std ~1), so the text refiner's input bias does not drown them
        te.get_input_embeddings().weight.mul_(50.0)
    tok2 = ByT5Tokenizer()
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                  pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(32, 32, 32),
                                    layers_per_block=1, spatial_compression_ratio=4, sample_size=16,
                                    scaling_factor=0.75)
    tr = token_wise_modulation(token_wise(HunyuanImageTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=32, text_embed_2_dim=16,
        rope_axes_dim=(8, 8))))
    HunyuanImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                         tokenizer_2=tok2, transformer=tr, guider=None, ocr_guider=None).save_pretrained(path)
    return path


def build_qwen_image(path: Path) -> Path:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    te = _qwen25vl(tok, 2)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.5, 0.5, 1.0, 2.0])
    tr = token_wise(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))
    QwenImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=te, tokenizer=tok, transformer=tr).save_pretrained(path)
    return path


def build_z_image(path: Path) -> Path:
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    tok = qwen_tokenizer(chat=True)
    te = same_word_embeddings(identity_layers(Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=tok.pad_token_id))), tok)
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
                                  axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    with torch.no_grad():  # the text refiner adds nothing: text queries/keys of the first joint layer are token-wise
        for name, mod in tr.context_refiner.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(("attention.to_out.0", "feed_forward.w2")):
                mod.weight.zero_()
    ZImagePipeline(scheduler=_scheduler(), vae=_kl_vae(32), text_encoder=te, tokenizer=tok,
                   transformer=tr).save_pretrained(path)
    return path


@dataclass(frozen=True)
class TinyCase:
    """A tiny pipeline and the settings a build on it uses."""

    name: str  # the case (a family id, or family-variant)
    family: str  # the engine registry id the trainer must detect
    pipeline: str  # the pipeline class model_index.json names
    build: Callable[[Path], Path]
    size: int  # image height = width (pixels)
    max_len: int  # max_sequence_length
    config: dict[str, Any] = field(default_factory=dict)  # more config keys for the build


CASES: dict[str, TinyCase] = {c.name: c for c in (
    TinyCase("flux1", "flux1", "FluxPipeline", build_tiny_flux, 16, 12),
    TinyCase("chroma", "chroma", "ChromaPipeline", build_chroma, 16, 12),
    TinyCase("flux2", "flux2", "Flux2Pipeline", build_flux2, 16, 16),
    TinyCase("flux2-klein", "flux2", "Flux2KleinPipeline", build_flux2_klein, 16, 16),
    TinyCase("hunyuan_image", "hunyuan_image", "HunyuanImagePipeline", build_hunyuan_image, 16, 12),
    TinyCase("qwen_image", "qwen_image", "QwenImagePipeline", build_qwen_image, 16, 12),
    TinyCase("z_image", "z_image", "ZImagePipeline", build_z_image, 32, 24,
             {"select.kinds": ["main"]}),
)}

"""Construct the components of the toy FLUX pipeline from a :class:`ToyConfig`.

Tokenizers are built locally from the world's vocabulary (nothing is downloaded):

* ``tokenizer`` is a real CLIP byte-level BPE whose merges are learned on the world's
  words, so every word of the world is one token;
* ``tokenizer_2`` is a T5 Unigram tokenizer whose pieces are the world's words
  (``"▁red"``) plus single letters as a fallback for unknown words.

Both are saved with ``save_pretrained`` and load with the standard ``CLIPTokenizer`` /
``T5TokenizerFast`` classes that ``FluxPipeline`` names in ``model_index.json``.
"""

from __future__ import annotations

import json
import logging
import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from . import world
from .config import ToyConfig

logger = logging.getLogger(__name__)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_WORD_SCORE = -1.0
_T5_CHAR_SCORE = -20.0

#: Scheduler settings of FLUX.1-dev (dynamic shifting by image sequence length).
SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


def build_clip_tokenizer(cfg: ToyConfig) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make every world word a single token."""
    words = world.vocabulary()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # large enough that training stops only when every word is merged
        min_frequency=1,
        show_progress=False,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(words, trainer=trainer)
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    # Letters as word-final symbols, so unknown words still tokenize without <unk>.
    for ch in string.ascii_lowercase:
        vocab.setdefault(f"{ch}</w>", len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=cfg.text_max_length)
    _check_single_tokens(tok, words, n_special=2)
    return tok


def build_t5_tokenizer(cfg: ToyConfig) -> T5TokenizerFast:
    """A T5 Unigram tokenizer with one piece per world word (plus letters as fallback)."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in T5_SPECIALS]
    pieces += [("▁", _T5_CHAR_SCORE)]
    pieces += [(f"▁{w}", _T5_WORD_SCORE) for w in world.vocabulary()]
    pieces += [(ch, _T5_CHAR_SCORE) for ch in string.ascii_lowercase]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=cfg.text_max_length)
    _check_single_tokens(tok, world.vocabulary(), n_special=1)
    return tok


def _check_single_tokens(tok, words: list[str], n_special: int) -> None:
    for w in words:
        ids = tok(w)["input_ids"]
        if len(ids) != 1 + n_special:
            raise RuntimeError(f"{type(tok).__name__}: word {w!r} is not a single token: {tok.convert_ids_to_tokens(ids)}")


def build_text_encoders(
    cfg: ToyConfig, clip_tok: CLIPTokenizer, t5_tok: T5TokenizerFast
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Tiny randomly initialised CLIP text model and T5 encoder for the given tokenizers."""
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=cfg.clip_hidden,
        intermediate_size=4 * cfg.clip_hidden,
        projection_dim=cfg.clip_hidden,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads,
        max_position_embeddings=cfg.text_max_length,
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=cfg.t5_d_model,
        d_kv=cfg.t5_d_model // cfg.t5_heads,
        d_ff=cfg.t5_ff,
        num_layers=cfg.t5_layers,
        num_decoder_layers=0,
        num_heads=cfg.t5_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=cfg.text_max_length,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )
    return CLIPTextModel(clip_cfg), T5EncoderModel(t5_cfg)


def build_vae(cfg: ToyConfig) -> AutoencoderKL:
    """A tiny AutoencoderKL (no quant convs, like FLUX's), spatial factor ``cfg.vae_scale_factor``."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.vae_latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_transformer(cfg: ToyConfig) -> FluxTransformer2DModel:
    """A tiny FluxTransformer2DModel; text dims follow the text encoders of ``cfg``."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * cfg.vae_latent_channels,  # FLUX packs 2x2 latent patches
        num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.t5_d_model,
        pooled_projection_dim=cfg.clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=cfg.axes_dims_rope,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

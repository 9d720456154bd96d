"""Tiny diffusers transformers of every registered model family, and concept adapters built on them.

Each :class:`Family` builds a randomly initialised transformer with a few blocks of each kind
and calls it on synthetic text embeddings. :func:`concept_adapter` builds an adapter the way the
product does (design §3): the model's own queries/keys at the "trigger" text tokens of concept
prompts are collected through :func:`saferope_engine.diffusers.observe_qk`, their Gram matrices
give each head's unsafe basis, and random skew generators rotate inside it — so the gate fires on
prompts carrying the concept and on nothing else.

A new family adds one entry to :data:`FAMILIES` (the registry's checklist says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saferope_engine import SafeRoPEAdapter, arch
from saferope_engine.diffusers import model_shapes, observe_qk
from saferope_engine.subspace import GramAccumulator, assemble_adapter, select_heads

TRIGGERS = 3  # tokens 1..3 of a concept prompt carry the concept
CONCEPT = 8.0  # size of the concept direction added to those tokens


@dataclass(frozen=True)
class Family:
    """A tiny diffusers transformer of one family and how to call it."""

    arch: str
    text_dim: int
    build: Callable[[int], torch.nn.Module]
    call: Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]  # (model, text (B, T, C), seed) -> output
    threshold: float = 0.5  # between the LRS of safe tokens and of the concept's tokens in this tiny model
    kinds: tuple[str, ...] | None = None  # kinds the concept adapter patches (default: every kind with text)


def _img(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- FLUX-style (flux1, chroma) -------------------------------------------------------------------
def _ids3(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)  # (h·w, 3)


def _flux1_build(seed: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=128,
                                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8,
                                  guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()


def _flux1_call(model, text, seed):
    B, T = text.shape[:2]
    return model(hidden_states=_img(seed, B, 16, 16), encoder_hidden_states=text, pooled_projections=_img(seed + 1, B, 8),
                 timestep=torch.full((B,), 0.6), img_ids=_ids3(4, 4), txt_ids=torch.zeros(T, 3),
                 guidance=torch.full((B,), 3.5), return_dict=False)[0]


def _chroma_build(seed: int) -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=128,
                                    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(16, 56, 56),
                                    approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1).eval()


def _chroma_call(model, text, seed):
    B, T = text.shape[:2]
    return model(hidden_states=_img(seed, B, 16, 16), encoder_hidden_states=text, timestep=torch.full((B,), 0.6),
                 img_ids=_ids3(4, 4), txt_ids=torch.zeros(T, 3), return_dict=False)[0]


# -- Flux.2 ---------------------------------------------------------------------------------------
def _flux2_build(seed: int) -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=128,
                                   num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                                   axes_dims_rope=[32, 32, 32, 32]).eval()


def _flux2_call(model, text, seed):
    B, T = text.shape[:2]
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))  # (16, 4)
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(T))  # (T, 4)
    return model(hidden_states=_img(seed, B, 16, 16), encoder_hidden_states=text,
                 img_ids=img_ids.unsqueeze(0).expand(B, -1, -1), txt_ids=txt_ids.unsqueeze(0).expand(B, -1, -1),
                 timestep=torch.full((B,), 0.6), guidance=torch.full((B,), 3.5), return_dict=False)[0]


# -- HunyuanImage 2.1 -----------------------------------------------------------------------------
def _hunyuan_build(seed: int) -> torch.nn.Module:
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    return HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=128,
                                          num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=(1, 1),
                                          guidance_embeds=False, text_embed_dim=24, text_embed_2_dim=None,
                                          rope_axes_dim=(64, 64)).eval()


def _hunyuan_call(model, text, seed):
    B, T = text.shape[:2]
    return model(hidden_states=_img(seed, B, 4, 4, 4), timestep=torch.full((B,), 600.0), encoder_hidden_states=text,
                 encoder_attention_mask=torch.ones(B, T, dtype=torch.long), return_dict=False)[0]


# -- Qwen-Image -----------------------------------------------------------------------------------
def _qwen_build(seed: int) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=128,
                                       num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(16, 56, 56)).eval()


def _qwen_call(model, text, seed):
    B, T = text.shape[:2]
    return model(hidden_states=_img(seed, B, 16, 16), encoder_hidden_states=text,
                 encoder_hidden_states_mask=torch.ones(B, T, dtype=torch.long), timestep=torch.full((B,), 0.6),
                 img_shapes=[(1, 4, 4)] * B, return_dict=False)[0]


# -- Z-Image --------------------------------------------------------------------------------------
def _zimage_build(seed: int) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=256, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=24,
                                    axes_dims=[32, 48, 48], axes_lens=[256, 32, 32]).eval()


def _zimage_call(model, text, seed):
    B = text.shape[0]
    out = model(x=[_img(seed + b, 4, 1, 8, 8) for b in range(B)], t=torch.full((B,), 0.6),
                cap_feats=[text[b] for b in range(B)], return_dict=False)[0]
    return torch.stack(out)


FAMILIES: dict[str, Family] = {f.arch: f for f in (
    Family("flux1", 24, _flux1_build, _flux1_call),
    Family("flux2", 24, _flux2_build, _flux2_call),
    Family("chroma", 24, _chroma_build, _chroma_call),
    Family("hunyuan_image", 24, _hunyuan_build, _hunyuan_call),
    Family("qwen_image", 24, _qwen_build, _qwen_call),
    # the refiner keeps the concept nearly pure (LRS ≥ 0.86) and the joint layers mix it (0.22–0.5) while safe
    # tokens reach 0.47 in the refiner and 0.19 in the joint layers: one threshold separates the joint layers only
    Family("z_image", 24, _zimage_build, _zimage_call, threshold=0.21, kinds=("main",)),
)}
assert set(FAMILIES) == set(arch.ids()), "every registered family needs a tiny-model fixture here"


def concept_direction(dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    v = torch.randn(dim, generator=g)
    return v / v.norm()


def text(dim: int, seed: int, length: int = 10, concept: bool = False, batch: int = 1) -> torch.Tensor:
    """``(batch, length, dim)`` synthetic text embeddings; with ``concept`` tokens 1..3 carry the concept."""
    t = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed)) * 0.5
    c = concept_direction(dim)
    t = t - (t @ c)[..., None] * c  # ordinary tokens carry nothing of the concept direction
    if concept:
        t[:, 1:1 + TRIGGERS] += CONCEPT * concept_direction(dim)
    return t


def concept_adapter(family: Family, model: torch.nn.Module, *, rank: int = 2, scale: float = 3.0,
                    threshold: float | None = None, seed: int = 7, kinds: tuple[str, ...] | None = None) -> SafeRoPEAdapter:
    """An adapter whose bases span the model's own q/k at the concept tokens (every head of every block of
    ``kinds``, default: every kind that sees text tokens), generators on the text tokens."""
    shapes = model_shapes(model)
    acc = GramAccumulator(shapes.num_heads, shapes.head_dim, num_kv_heads=shapes.num_kv_heads)
    length = 10

    def observe(kind, index, which, x, txt_len, img_first):
        if txt_len == 0:  # an image-only stream: the concept lives in the text tokens
            return
        mask = torch.zeros(x.shape[0], txt_len, dtype=torch.bool)
        mask[:, 1:1 + TRIGGERS] = True  # the trigger tokens (padding, if any, follows the prompt)
        acc.add(kind, index, which, x, txt_len=txt_len, img_first=img_first, txt_mask=mask, segments=("txt",))

    with torch.no_grad(), observe_qk(model, observe):
        for s in range(4):
            family.call(model, text(family.text_dim, 100 + s, length, concept=True), s)
    family_kinds = arch.get(shapes.arch).kinds
    kinds = kinds or family.kinds or tuple(k.name for k in family_kinds if "txt" in k.segments)  # the concept's tokens
    scores = {kind: torch.ones(n, shapes.num_heads) for kind, n in shapes.blocks.items() if kind in kinds}
    selection = select_heads(scores, margin=0.0)
    adapter = assemble_adapter(acc, selection, rank=rank, blocks=shapes.blocks, arch=shapes.arch,
                               threshold=family.threshold if threshold is None else threshold,
                               concepts=("concept",), base_model=f"tiny-{family.arch}")
    g = torch.Generator().manual_seed(seed)
    for b in adapter.blocks.values():
        for seg in ("txt", "img"):
            A = b.generator(seg)
            if A is None:
                continue
            w = torch.randn(A.shape, generator=g, dtype=torch.float64)
            skew = w - w.transpose(-1, -2)
            A.copy_((skew / torch.linalg.matrix_norm(skew)[:, None, None] * scale).float())
    adapter.validate(for_file=True)
    return adapter

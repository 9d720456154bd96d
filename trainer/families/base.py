"""What the trainer needs to know of a model family, as one small class per family (design §3, §8).

The engine's registry (:mod:`saferope_engine.arch`) says where SafeRoPE hooks a transformer; a
:class:`Family` here says how the trainer *drives* one: how its pipeline encodes prompts into the
transformer's text inputs (and which of those tokens are real, not padding), how one call gives a
velocity at a noise level σ (latent layout, timestep convention, guidance), how images become
latents for the ``flow`` objective, and how its pipeline is called to generate. Everything else —
collecting statistics, selecting heads, training, evaluating — is written once against this
interface.

Conventions every family keeps:

* latents live in the transformer's input space, ``(B, *latent_shape)``; the flow-matching
  convention is ``x_σ = (1 − σ)·x₀ + σ·ε`` with velocity ``v = ε − x₀``, so an Euler step from σ
  to σ' is ``x ← x + (σ' − σ)·v`` (a family whose transformer predicts ``−v`` negates it);
* encoded prompts are a :class:`TextBatch` of named tensors: ``embeds`` ``(B, L, C)`` and ``mask``
  ``(B, L)`` (true for real tokens) always, plus what the family's transformer also takes
  (``pooled``, a second encoder's ``embeds_2``/``mask_2``, an attention mask ``attn``);
* statistics count real text tokens only (:meth:`Family.site_mask`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saferope_engine import ModelShapes

from ..core.errors import UsageError

logger = logging.getLogger(__name__)


class TextBatch:
    """Encoded prompts: named tensors with the batch first. ``embeds`` ``(B, L, C)`` and ``mask`` ``(B, L)`` bool
    (real, non-padding tokens) are always there; a family adds what its transformer takes besides."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        if "embeds" not in tensors or "mask" not in tensors:
            raise ValueError(f"a TextBatch needs 'embeds' and 'mask', got {sorted(tensors)}")
        self.tensors = dict(tensors)

    @property
    def embeds(self) -> Tensor:
        return self.tensors["embeds"]

    @property
    def mask(self) -> Tensor:
        return self.tensors["mask"]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def to(self, device, dtype) -> TextBatch:
        """On ``device``; floating tensors in ``dtype`` (masks keep theirs)."""
        return TextBatch({k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                          for k, v in self.tensors.items()})

    def trimmed(self, names: Sequence[str], by: str) -> TextBatch:
        """The tensors ``names`` cut on dim 1 to the longest row of mask ``by`` (at least one token).

        For transformers that mask text padding out of attention, the padding beyond every prompt
        changes nothing but the cost (rows keep their real tokens first).
        """
        m = self.tensors[by]
        n = max(1, int(m.bool().sum(1).max())) if m.numel() else 1
        return TextBatch({k: v[:, :n] if k in names else v for k, v in self.tensors.items()})

    @staticmethod
    def first_tokens(counts: Tensor, length: int) -> Tensor:
        """``(B, length)`` bool mask of the first ``counts[b]`` tokens of each row."""
        return torch.arange(length, device=counts.device)[None, :] < counts[:, None]  # (1, L) < (B, 1)


@dataclass(frozen=True)
class ModelInfo:
    """A checked model folder: its family and what its configs say (no weights loaded)."""

    spec: str  # what the user gave
    path: Path  # the folder
    name: str  # a readable name (hub id, folder name or a registered name such as "toy")
    family: str  # the engine registry id
    pipeline: str  # the pipeline class model_index.json names
    components: Mapping[str, tuple[str, str]]  # model_index.json: component -> (library, class)
    shapes: ModelShapes  # read off the transformer built on the meta device (what an adapter must match)
    transformer_config: Mapping[str, Any] = field(default_factory=dict)
    vae_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.shapes.num_heads

    @property
    def head_dim(self) -> int:
        return self.shapes.head_dim

    def component_class(self, name: str) -> str:
        return self.components.get(name, ("", ""))[1]

    def identity(self, parts: Sequence[str]) -> dict[str, Any]:
        """What identifies the text encoders' output (the embedding cache key): the files of ``parts``."""
        out: dict[str, Any] = {"path": str(self.path.resolve()), "pipeline": self.pipeline}
        for sub in parts:
            folder = self.path / sub
            out[sub] = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in folder.iterdir()
                              if f.is_file()) if folder.is_dir() else None
        return out


class Caller:
    """Calls one family's transformer on latents of a fixed image size (subclassed per family).

    ``velocity(x, σ, text)`` returns ``v = ε − x₀`` in the shape of ``x``; ``noise`` draws standard
    normal latents on the CPU (so draws do not depend on the device); ``from_vae`` maps cached
    normalised VAE latents into the transformer's input space.
    """

    def __init__(self, family: Family, transformer: torch.nn.Module, info: ModelInfo, height: int, width: int,
                 guidance: float, device: torch.device, dtype: torch.dtype) -> None:
        self.family, self.transformer, self.info = family, transformer, info
        self.height, self.width, self.guidance = height, width, guidance
        self.device, self.dtype = device, dtype
        self.config = transformer.config
        self.latent_shape: tuple[int, ...] = family.latent_shape(info, height, width)

    def noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """``(B, *latent_shape)`` standard normal latents (drawn on the CPU: device-independent)."""
        x = torch.randn(batch, *self.latent_shape, generator=generator)
        return x.to(self.device, self.dtype)

    def from_vae(self, latents: Tensor) -> Tensor:
        """Normalised VAE latents (what :meth:`Family.encode_pixels` returns) -> the transformer's input."""
        return latents

    def velocity(self, x: Tensor, sigma: Tensor, text: TextBatch) -> Tensor:  # pragma: no cover - abstract
        """Predicted velocity (shape of ``x``) at noise levels ``sigma`` ``(B,)``."""
        raise NotImplementedError

    def guidance_tensor(self, batch: int, scale: float = 1.0) -> Tensor | None:
        """The guidance embedding's input (``guidance × scale`` per sample) when the transformer has one."""
        if not self.config.get("guidance_embeds", False):
            return None
        return torch.full((batch,), self.guidance * scale, device=self.device, dtype=torch.float32)

    def rollout(self, x1: Tensor, text: TextBatch, sigma: float, steps: int) -> Tensor:
        """Euler-integrate from pure noise ``x1`` (σ = 1) down to ``sigma`` on the grid ``k/steps``.

        The caller decides which model runs (e.g. inside ``handle.bypassed()`` for the base model).
        """
        x = x1
        k = steps
        with torch.no_grad():
            while k / steps > sigma + 1e-9:
                s, s_next = k / steps, (k - 1) / steps
                v = self.velocity(x, torch.full((x.shape[0],), s), text)
                x = x + (s_next - s) * v.to(x.dtype)
                k -= 1
        return x


def pack_2x2(latents: Tensor) -> Tensor:
    """``(B, c, h, w)`` latents -> ``(B, (h/2)·(w/2), 4c)`` tokens of 2×2 patches (FLUX.1's, Qwen-Image's packing)."""
    B, c, h, w = latents.shape
    x = latents.reshape(B, c, h // 2, 2, w // 2, 2)  # split into 2×2 patches
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, c, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), c * 4)


def grid_ids(rows: int, cols: int, width: int, row_axis: int, col_axis: int) -> Tensor:
    """``(rows·cols, width)`` position ids: zeros except the row and column index on the given axes."""
    ids = torch.zeros(rows, cols, width)
    ids[..., row_axis] = torch.arange(rows)[:, None]
    ids[..., col_axis] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, width)  # (rows, cols, width) -> (rows·cols, width)


def checkpoint_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` under activation checkpointing (recomputed in backward), keyword arguments passed on.

    diffusers' default checkpoint function takes positional arguments only, and some transformers
    (HunyuanImage in diffusers 0.42) call their blocks with keywords, which it refuses.
    """
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)


@functools.cache
def pipeline_default_cells(pipeline: str) -> int:
    """``default_sample_size`` of a diffusers pipeline class (set in its ``__init__``: built without components)."""
    import diffusers

    cls = getattr(diffusers, pipeline, None)
    if cls is None:
        return 0
    try:
        pipe = cls(**{p: None for p in inspect.signature(cls.__init__).parameters if p != "self"})
    except Exception:  # a pipeline that cannot be built empty: no default known
        logger.debug("%s cannot be built without components", pipeline, exc_info=True)
        return 0
    cells = getattr(pipe, "default_sample_size", 0)
    return cells if isinstance(cells, int) and cells > 0 else 0


def default_of(function: Any, parameter: str) -> Any:
    """The default value of ``parameter`` in ``function``'s signature (a pipeline's own default length)."""
    return inspect.signature(function).parameters[parameter].default


class Family:
    """One model family's trainer side; a module ``trainer/families/<id>.py`` holds ``FAMILY = <subclass>()``.

    Class attributes:
        id: the engine registry id (``flux1`` …), also the key of recipes' ``[defaults.<id>]`` tables.
        text_parts: the pipeline components that encoding prompts loads (everything else stays on disk).
        patch: latent cells per token side the image size must be a multiple of (2 for 2×2 packing).
        defaults: run-config values this family needs besides the trainer's defaults (a table like a
            recipe's ``[defaults.<id>]``; below the recipe, the config file and the flags).
    """

    id: str = ""
    text_parts: tuple[str, ...] = ("text_encoder", "tokenizer")
    patch: int = 2
    defaults: Mapping[str, Any] = {}

    # -- the folder --------------------------------------------------------------------------
    def vae_scale_factor(self, info: ModelInfo) -> int:
        """Pixels per latent cell of the VAE (each extra resolution level of its encoder halves the size)."""
        channels = info.vae_config.get("block_out_channels")
        if not isinstance(channels, list) or not channels:
            raise UsageError(f"MODEL {info.spec!r}: vae/config.json has no block_out_channels")
        return 2 ** (len(channels) - 1)

    def patch_size(self, info: ModelInfo) -> int:
        """Latent cells per token side (:attr:`patch`; a family may read it from the transformer's config)."""
        return self.patch

    def sample_size(self, info: ModelInfo) -> int:
        """The default image size in pixels: the VAE config's ``sample_size``, else the pipeline's own default
        (its ``default_sample_size`` latent cells × the VAE's scale factor, as it sizes an image without
        ``height``; Qwen-Image's VAE records none); 0 when neither is known."""
        size = info.vae_config.get("sample_size", 0)
        size = int(size[0] if isinstance(size, list) else size or 0)
        if size:
            return size
        cells = pipeline_default_cells(info.pipeline)
        return cells * self.vae_scale_factor(info) if cells else 0

    def text_limit(self, info: ModelInfo) -> int:
        """The text length the family's pipeline encodes prompts to by default (its ``encode_prompt``'s
        ``max_sequence_length``; a family whose pipeline keeps it elsewhere overrides this)."""
        import diffusers

        return int(default_of(getattr(diffusers, info.pipeline).encode_prompt, "max_sequence_length"))

    def text_cap(self, info: ModelInfo) -> int:
        """The longest text length the encoders accept (0: no known cap beyond :meth:`text_limit`)."""
        return 0

    def max_sequence_length(self, info: ModelInfo, requested: int) -> int:
        """``requested`` (checked against :meth:`text_cap`) or the family's default length."""
        cap = self.text_cap(info)
        if requested:
            if cap and requested > cap:
                raise UsageError(f"max_sequence_length {requested} exceeds the model's text limit {cap}")
            return requested
        limit = self.text_limit(info)
        if not limit:
            raise UsageError(f"MODEL {info.spec!r}: its text length is unknown; set max_sequence_length")
        return min(limit, cap) if cap else limit

    def image_size(self, info: ModelInfo, height: int, width: int) -> tuple[int, int]:
        """Pixel size: the requested one or the default; must fit the VAE and the latent packing."""
        h, w = height or self.sample_size(info), width or self.sample_size(info)
        if not (h and w):
            raise UsageError(f"MODEL {info.spec!r}: no VAE sample size in its config; set height and width")
        mult = self.vae_scale_factor(info) * self.patch_size(info)
        if h % mult or w % mult:
            raise UsageError(f"height/width {h}×{w} must be multiples of {mult} for this model")
        return h, w

    def latent_shape(self, info: ModelInfo, height: int, width: int) -> tuple[int, ...]:  # pragma: no cover
        """The shape of one sample's latents in the transformer's input space."""
        raise NotImplementedError

    def packed_latent_shape(self, info: ModelInfo, height: int, width: int) -> tuple[int, ...]:
        """``(tokens, channels)`` of latents packed in 2×2 patches (FLUX.1, Flux.2, Qwen-Image)."""
        f = self.vae_scale_factor(info)
        rows, cols = height // (f * 2), width // (f * 2)  # latent patches per side
        return (rows * cols, int(info.transformer_config["in_channels"]))

    def config_defaults(self, info: ModelInfo) -> Mapping[str, Any]:
        """Run-config values for a model of this family (:attr:`defaults`; a family may look at the pipeline)."""
        return self.defaults

    # -- text --------------------------------------------------------------------------------
    def encode(self, pipe: Any, prompts: list[str], *, max_len: int, device: torch.device) -> dict[str, Tensor]:
        """Encode ``prompts`` with the pipeline's own ``encode_prompt``: named tensors on the CPU, batch first,
        ``embeds`` ``(B, L, C)`` and ``mask`` ``(B, L)`` among them (``L`` may differ between calls)."""
        raise NotImplementedError  # pragma: no cover

    def real_tokens(self, text: TextBatch) -> Tensor:
        """``(B,)`` real text tokens per prompt as the transformer's blocks see them."""
        return text.mask.sum(1)

    def site_mask(self, text: TextBatch, txt_len: int) -> Tensor:
        """``(B, txt_len)`` bool: the real tokens among the ``txt_len`` text tokens a QK-norm site sees.

        When the site sees the text as encoded, the mask itself; otherwise (the transformer trimmed,
        reordered or padded it) the first :meth:`real_tokens` of each row, real tokens leading.
        """
        if txt_len == text.mask.shape[1]:
            return text.mask.bool()
        return TextBatch.first_tokens(self.real_tokens(text).to(text.mask.device), txt_len)

    # -- the transformer ---------------------------------------------------------------------
    caller_class: type[Caller] = Caller

    def caller(self, transformer: torch.nn.Module, info: ModelInfo, height: int, width: int, guidance: float,
               device: torch.device, dtype: torch.dtype) -> Caller:
        return self.caller_class(self, transformer, info, height, width, guidance, device, dtype)

    def enable_gradient_checkpointing(self, transformer: torch.nn.Module) -> Callable[[], None]:
        """Recompute each block in backward instead of keeping its activations (``--gradient-checkpointing``);
        returns the function that turns it off. A family whose transformer calls its blocks otherwise under
        checkpointing than without overrides this (Chroma)."""
        transformer.enable_gradient_checkpointing(checkpoint_call)
        return transformer.disable_gradient_checkpointing

    # -- images ------------------------------------------------------------------------------
    def encode_pixels(self, vae: Any, pixels: Tensor) -> Tensor:
        """Normalised VAE latents of ``(B, 3, H, W)`` pixels in [-1, 1] (``(z − shift)·scale``; the flow objective)."""
        z = vae.encode(pixels).latent_dist.mode()
        shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        return (z - shift) * scale

    # -- generation --------------------------------------------------------------------------
    def pipeline_options(self, pipe: Any, *, guidance: float, max_len: int, batch: int) -> dict[str, Any]:
        """Keyword arguments of the pipeline call besides prompts, generators, steps and size."""
        return {"guidance_scale": guidance, "max_sequence_length": max_len}

    def generate(self, pipe: Any, prompts: Sequence[str], generators: Sequence[torch.Generator], *, steps: int,
                 guidance: float, height: int, width: int, max_len: int) -> list:
        """PIL images of ``prompts`` through the family's own pipeline call."""
        with torch.no_grad():
            out = pipe(prompt=list(prompts), generator=list(generators), num_inference_steps=steps, height=height,
                       width=width, output_type="pil",
                       **self.pipeline_options(pipe, guidance=guidance, max_len=max_len, batch=len(prompts)))
        return list(out.images)


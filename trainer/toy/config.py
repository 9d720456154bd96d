"""Sizes and hyper-parameters of the toy FLUX pipeline, in one place.

Every size used to build, train or sample the toy model is derived from :class:`ToyConfig`
(or from the configs saved in the pipeline folder), never hard-coded elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from . import world

RECIPE_FILE = "toy_recipe.json"
#: The shipped toy FLUX pipeline folder (``FluxPipeline.from_pretrained(TOY_MODEL_DIR)``).
TOY_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to sample the toy model through ``diffusers.FluxPipeline``."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``FluxPipeline.__call__``."""
        return dataclasses.asdict(self)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / RECIPE_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> Recipe:
        data = json.loads((Path(folder) / RECIPE_FILE).read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Architecture and training settings of the toy model."""

    # World / images.
    image_size: int = world.IMAGE_SIZE

    # VAE (AutoencoderKL). Spatial factor = 2 ** (len(vae_channels) - 1).
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_latent_channels: int = 4
    vae_norm_groups: int = 8
    vae_layers_per_block: int = 1

    # Text encoders (trained jointly with the transformer, then frozen and shipped).
    text_max_length: int = 16  # tokenizer model_max_length = T5 max_sequence_length
    clip_hidden: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    t5_d_model: int = 64
    t5_layers: int = 2
    t5_heads: int = 4
    t5_ff: int = 128

    # Transformer (FluxTransformer2DModel).
    num_double_blocks: int = 2
    num_single_blocks: int = 2
    num_heads: int = 4
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # must sum to head_dim

    # Sampling recipe.
    num_inference_steps: int = 12
    guidance_scale: float = 3.5

    # Training.
    num_samples: int = 24_000
    vae_steps: int = 400
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    steps: int = 4_000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    clip_shuffle: float = 0.5  # probability that CLIP sees a random other caption in training
    ema_decay: float = 0.998
    guidance_range: tuple[float, float] = (1.0, 6.0)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        if self.image_size % (2 * self.vae_scale_factor):
            raise ValueError("image_size must be divisible by 2 * vae_scale_factor (FLUX packs 2x2 latents)")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    @property
    def recipe(self) -> Recipe:
        return Recipe(
            height=self.image_size,
            width=self.image_size,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            max_sequence_length=self.text_max_length,
        )

    def replace(self, **changes: Any) -> ToyConfig:
        return dataclasses.replace(self, **changes)

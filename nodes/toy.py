"""Nodes for the shipped toy FLUX model (category "SafeRoPE/toy"): the pack's demo inside ComfyUI.

``trainer/toy/model`` is a tiny diffusers ``FluxPipeline`` folder (README, "Toy concept world").
These nodes run it in ComfyUI on a CPU in seconds, so that SafeRoPE can be seen working in the
real UI without FLUX weights. They are demo nodes, kept apart from the product nodes:

* ``SafeRoPEToyLoader`` — builds **ComfyUI's own FLUX model** (``comfy.supported_models.Flux`` →
  ``comfy.model_base.Flux`` → ``comfy.ldm.flux.model.Flux``) from an explicit ``unet_config`` with
  the toy's sizes (ComfyUI's detection supplies the fields of its own version, the toy's configs
  every size), converts the diffusers weights with ComfyUI's key map
  (``comfy.utils.flux_to_diffusers``, applied by ``comfy.model_detection.convert_diffusers_mmdit``)
  and wraps the model in a ``ModelPatcher``. The latent format (the toy VAE's channels, scaling
  and shift factors, spatial factor) and the model sampling (the scheduler's dynamic shift at the
  toy's resolution) are set on the model config. It also returns the toy's text encoders and VAE.
* ``SafeRoPEToyTextEncode`` — prompt → CONDITIONING with exactly the embeddings of diffusers'
  ``FluxPipeline.encode_prompt`` (T5 sequence padded to the toy's ``max_sequence_length``, CLIP
  pooled output) plus guidance.
* ``SafeRoPEToyVAEDecode`` — LATENT → IMAGE with the toy ``AutoencoderKL`` (as the pipeline decodes).
* ``SafeRoPEToyEmptyLatent`` — an empty latent batch of the toy's shape.

Nothing here re-implements a model: the transformer is ComfyUI's, the encoders and the VAE are
diffusers'/transformers' classes loaded from the shipped folder. Importing this module needs
neither ComfyUI nor diffusers; running the nodes needs both (diffusers and transformers are
checked first and named in the error when missing).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..saferope_engine.errors import SafeRoPEError

logger = logging.getLogger(__name__)

#: The shipped toy pipeline, located relative to the pack (ComfyUI loads it from custom_nodes/<repo>).
TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "trainer" / "toy" / "model"
CATEGORY = "SafeRoPE/toy"
TEXT_TYPE = "SAFEROPE_TOY_TEXT_ENCODERS"
VAE_TYPE = "SAFEROPE_TOY_VAE"
#: FLUX packs 2×2 latent patches into one token (diffusers' FluxPipeline; ComfyUI's ``patch_size``).
FLUX_PACK = 2
RECIPE_FILE = "toy_recipe.json"
REQUIRED_FILES = (
    "model_index.json", RECIPE_FILE, "scheduler/scheduler_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer_config.json",
)
_GUIDANCE_FALLBACK = 3.5  # only for the widget default when the toy folder cannot be read (the node then fails)


class ToyModelError(SafeRoPEError, RuntimeError):
    """The toy model cannot be used: files missing, a config ComfyUI's FLUX cannot host, missing packages."""


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules, or a broken install
        return False


def require_diffusers() -> None:
    """Raise a clear error when diffusers or transformers is missing from ComfyUI's Python."""
    missing = [name for name in ("diffusers", "transformers") if not _importable(name)]
    if missing:
        raise ToyModelError(
            f"the SafeRoPE toy nodes need {' and '.join(missing)} in ComfyUI's Python environment "
            f"(for the toy's text encoders and VAE): run `python -m pip install diffusers transformers` "
            "with the Python that runs ComfyUI, then restart it. The other SafeRoPE nodes do not need them.")


@dataclasses.dataclass(frozen=True)
class ToyFolder:
    """The configs of a toy pipeline folder, and every size derived from them."""

    path: Path
    transformer: dict
    vae: dict
    scheduler: dict
    recipe: dict

    @classmethod
    def read(cls, path: str | os.PathLike | None = None) -> ToyFolder:
        folder = Path(path) if path is not None else TOY_MODEL_DIR
        missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
        if missing:
            raise ToyModelError(
                f"the SafeRoPE toy model at {folder} is incomplete: missing {', '.join(missing)}. It ships with the "
                "pack (trainer/toy/model); reinstall the pack, or rebuild it with "
                "`python -m trainer.toy train --out trainer/toy/model`.")

        def load(name: str) -> dict:
            try:
                return json.loads((folder / name).read_text())
            except (OSError, ValueError) as e:
                raise ToyModelError(f"the SafeRoPE toy model: cannot read {folder / name}: {e}") from e

        toy = cls(folder, load("transformer/config.json"), load("vae/config.json"),
                  load("scheduler/scheduler_config.json"), load(RECIPE_FILE))
        toy.check()
        return toy

    def _get(self, part: str, key: str) -> Any:
        value = getattr(self, part).get(key)
        if value is None:
            raise ToyModelError(f"the SafeRoPE toy model's {part} config ({self.path}) has no {key!r}")
        return value

    def check(self) -> None:
        """Fail early, naming the setting, if ComfyUI's FLUX model could not host this folder."""
        if self.transformer.get("_class_name") != "FluxTransformer2DModel":
            raise ToyModelError(f"{self.path}: the transformer is a {self.transformer.get('_class_name')!r}, "
                                "not a FluxTransformer2DModel")
        if self.transformer.get("patch_size", 1) != 1:
            raise ToyModelError(f"{self.path}: transformer patch_size {self.transformer['patch_size']} (FLUX.1 uses 1 "
                                "on packed latents)")
        in_ch, lat = self._get("transformer", "in_channels"), self._get("vae", "latent_channels")
        if in_ch != lat * FLUX_PACK ** 2:
            raise ToyModelError(f"{self.path}: transformer in_channels {in_ch} ≠ {FLUX_PACK}×{FLUX_PACK} packed VAE "
                                f"latents of {lat} channels")
        sizes = self.comfy_sizes()  # every transformer size is present
        hd = sizes["hidden_size"] // sizes["num_heads"]
        if sum(sizes["axes_dim"]) != hd:
            raise ToyModelError(f"{self.path}: axes_dims_rope {sizes['axes_dim']} must sum to the head size {hd}")
        for key in ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"):
            self._get("recipe", key)
        f = FLUX_PACK * self.vae_scale_factor
        if self.recipe["height"] % f or self.recipe["width"] % f:
            raise ToyModelError(f"{self.path}: image size {self.recipe['height']}×{self.recipe['width']} is not a "
                                f"multiple of {f}")
        self.sampling_shift()  # validates the scheduler

    # -- sizes -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (diffusers: 2 ** (number of VAE blocks - 1))."""
        return 2 ** (len(self._get("vae", "block_out_channels")) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self._get("vae", "latent_channels"))

    @property
    def scaling_factor(self) -> float:
        return float(self._get("vae", "scaling_factor"))

    @property
    def shift_factor(self) -> float:
        return float(self.vae.get("shift_factor") or 0.0)

    @property
    def guidance(self) -> float:
        return float(self.recipe["guidance_scale"])

    @property
    def max_sequence_length(self) -> int:
        return int(self.recipe["max_sequence_length"])

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """``(B, C, h, w)`` of an empty latent at the toy's image size."""
        f = self.vae_scale_factor
        return (batch_size, self.latent_channels, self.recipe["height"] // f, self.recipe["width"] // f)

    @property
    def image_tokens(self) -> int:
        _, _, h, w = self.latent_shape(1)
        return (h // FLUX_PACK) * (w // FLUX_PACK)

    def sampling_shift(self) -> float:
        """The ``mu`` of ComfyUI's ``ModelSamplingFlux`` that equals the toy scheduler at the toy's resolution.

        FluxPipeline shifts its sigmas by ``exp(mu) / (exp(mu) + 1/t - 1)`` with ``mu`` from the image's
        token count (``use_dynamic_shifting``, ``time_shift_type = "exponential"``) — the same function
        as ComfyUI's ``flux_time_shift(mu, 1.0, t)``. Other scheduler settings have no ComfyUI
        counterpart here and are refused.
        """
        s = self.scheduler
        if s.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ToyModelError(f"{self.path}: scheduler {s.get('_class_name')!r} is not FlowMatchEulerDiscreteScheduler")
        odd = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                           "stochastic_sampling", "shift_terminal") if s.get(k)]
        if not s.get("use_dynamic_shifting") or s.get("time_shift_type", "exponential") != "exponential" or odd:
            raise ToyModelError(f"{self.path}: the scheduler must use dynamic exponential shifting and nothing else "
                                f"(ComfyUI's ModelSamplingFlux); found use_dynamic_shifting="
                                f"{s.get('use_dynamic_shifting')}, time_shift_type={s.get('time_shift_type')!r}"
                                + (f", {', '.join(odd)}" if odd else ""))
        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        base_len, max_len, base_shift, max_shift = (float(self._get("scheduler", k)) for k in keys)
        slope = (max_shift - base_shift) / (max_len - base_len)  # diffusers' calculate_shift
        return self.image_tokens * slope + (base_shift - slope * base_len)

    def comfy_sizes(self) -> dict[str, Any]:
        """The toy's sizes in the vocabulary of ComfyUI's ``FluxParams``."""
        def get(key: str) -> Any:
            return self._get("transformer", key)

        in_ch = int(get("in_channels"))
        heads = int(get("num_attention_heads"))
        return {
            "image_model": "flux",
            "in_channels": in_ch // FLUX_PACK ** 2,
            "out_channels": int(self.transformer.get("out_channels") or in_ch) // FLUX_PACK ** 2,
            "vec_in_dim": int(get("pooled_projection_dim")),
            "context_in_dim": int(get("joint_attention_dim")),
            "hidden_size": heads * int(get("attention_head_dim")),
            "num_heads": heads,
            "depth": int(get("num_layers")),
            "depth_single_blocks": int(get("num_single_layers")),
            "axes_dim": [int(a) for a in get("axes_dims_rope")],
            "patch_size": FLUX_PACK,
            "guidance_embed": bool(self.transformer.get("guidance_embeds", False)),
        }



def fingerprint(folder: Path = TOY_MODEL_DIR) -> str:
    """Sizes and modification times of a toy folder's files (the loader's IS_CHANGED)."""
    parts = []
    for name in REQUIRED_FILES:
        try:
            st = (folder / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:missing")
    return "|".join(parts)


# -- ComfyUI's FLUX ------------------------------------------------------------------------------------------

@functools.cache
def _latent_format_class() -> type:
    """A ComfyUI LatentFormat for the toy VAE (defined on first use: it needs ComfyUI)."""
    from comfy import latent_formats  # type: ignore[import-not-found]

    class SafeRoPEToyLatentFormat(latent_formats.LatentFormat):
        """The toy VAE's latents: ``(z - shift) * scale`` in the model, as FluxPipeline does."""

        latent_rgb_factors = None  # no live preview (no TAESD/RGB approximation for the toy VAE)

        def __init__(self, channels: int, scale_factor: float, shift_factor: float, downscale: int) -> None:
            self.latent_channels = channels
            self.scale_factor = scale_factor
            self.shift_factor = shift_factor
            self.spacial_downscale_ratio = downscale

        def process_in(self, latent):
            return (latent - self.shift_factor) * self.scale_factor

        def process_out(self, latent):
            return latent / self.scale_factor + self.shift_factor

    return SafeRoPEToyLatentFormat


def latent_format(toy: ToyFolder) -> Any:
    return _latent_format_class()(toy.latent_channels, toy.scaling_factor, toy.shift_factor, toy.vae_scale_factor)


def comfy_unet_config(toy: ToyFolder, converted: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``unet_config`` for ComfyUI's FLUX: what ComfyUI detects from the converted weights (the fields its
    version has), overridden by every size of the toy's configs (detection assumes FLUX.1-dev's 24 × 128
    heads and ``axes_dim`` [16, 56, 56], or derives heads as hidden/128, depending on the version)."""
    from comfy import model_detection  # type: ignore[import-not-found]

    detected = model_detection.detect_unet_config(converted, "")
    if not detected or detected.get("image_model") != "flux":
        raise ToyModelError(f"ComfyUI does not recognise the toy transformer ({toy.path}) as FLUX.1 "
                            f"(detected {detected.get('image_model') if detected else None!r})")
    sizes = toy.comfy_sizes()
    mlp = converted.get("double_blocks.0.img_mlp.0.weight")
    if mlp is None:
        raise ToyModelError(f"the converted toy transformer ({toy.path}) has no double_blocks.0.img_mlp.0.weight")
    return {**detected, **sizes, "mlp_ratio": mlp.shape[0] / sizes["hidden_size"],
            "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in converted}


def load_comfy_model(toy: ToyFolder) -> Any:
    """The toy transformer as a ComfyUI MODEL: ComfyUI's FLUX class, ComfyUI's key map, a ModelPatcher."""
    import comfy.model_detection  # type: ignore[import-not-found]
    import comfy.model_management  # type: ignore[import-not-found]
    import comfy.model_patcher  # type: ignore[import-not-found]
    import comfy.supported_models  # type: ignore[import-not-found]
    import comfy.utils  # type: ignore[import-not-found]

    weights = toy.path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = comfy.utils.load_torch_file(str(weights), safe_load=True)
    sizes = toy.comfy_sizes()
    key_map = comfy.utils.flux_to_diffusers({"depth": sizes["depth"], "depth_single_blocks": sizes["depth_single_blocks"],
                                             "hidden_size": sizes["hidden_size"]})
    unknown = sorted(set(sd) - set(key_map))
    if unknown:
        raise ToyModelError(f"{weights}: {len(unknown)} tensors that ComfyUI's FLUX key map does not know, e.g. "
                            f"{unknown[:4]}")
    converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if not converted:
        raise ToyModelError(f"{weights}: ComfyUI does not recognise these weights as a diffusers FLUX transformer")
    unet_config = comfy_unet_config(toy, converted)
    config_cls = comfy.supported_models.Flux if unet_config["guidance_embed"] else comfy.supported_models.FluxSchnell
    model_config = config_cls(unet_config)
    model_config.latent_format = latent_format(toy)
    model_config.sampling_settings = {**model_config.sampling_settings, "shift": toy.sampling_shift()}
    model_config.set_inference_dtype(torch.float32, None)  # 1.85 M parameters: always full precision
    model = model_config.get_model(converted, "")
    expected = set(model.diffusion_model.state_dict())
    given = set(model_config.process_unet_state_dict(dict(converted)))
    if expected != given:  # ComfyUI loads non-strictly and leaves missing weights uninitialised: refuse
        raise ToyModelError(f"{weights}: the converted weights do not fill ComfyUI's FLUX model: missing "
                            f"{sorted(expected - given)[:4]}, unexpected {sorted(given - expected)[:4]}")
    model.load_model_weights(converted, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    logger.info("SafeRoPE toy: ComfyUI FLUX model from %s — hidden %d, %d heads × %d, %d double + %d single blocks, "
                "axes_dim %s, latent %d ch (scale %.4g, shift %.4g, ÷%d), sampling shift %.4f",
                toy.path, sizes["hidden_size"], sizes["num_heads"], sizes["hidden_size"] // sizes["num_heads"],
                sizes["depth"], sizes["depth_single_blocks"], sizes["axes_dim"], toy.latent_channels,
                toy.scaling_factor, toy.shift_factor, toy.vae_scale_factor, toy.sampling_shift())
    return patcher


# -- text encoders and VAE (diffusers) -----------------------------------------------------------------------

class ToyTextEncoders:
    """The toy's CLIP + T5 encoders and tokenizers, through diffusers' own ``FluxPipeline.encode_prompt``."""

    def __init__(self, toy: ToyFolder) -> None:
        require_diffusers()
        from diffusers import FluxPipeline

        self.toy = toy
        with torch.inference_mode(False):
            self.pipe = FluxPipeline.from_pretrained(str(toy.path), transformer=None, vae=None, local_files_only=True,
                                                     low_cpu_mem_usage=False)
        self.pipe.set_progress_bar_config(disable=True)

    def token_counts(self, text: str) -> dict[str, int]:
        """Tokens of ``text`` for each encoder, special tokens included."""
        return {"T5": len(self.pipe.tokenizer_2(text).input_ids), "CLIP": len(self.pipe.tokenizer(text).input_ids)}

    def unknown_words(self, text: str) -> list[str]:
        """Words that the toy's T5 tokenizer only spells letter by letter (the toy never saw them)."""
        tok = self.pipe.tokenizer_2
        return [w for w in text.split() if len(tok.tokenize(w)) != 1]

    def encode(self, text: str, guidance: float) -> list:
        limits = {"T5": self.toy.max_sequence_length, "CLIP": int(self.pipe.tokenizer.model_max_length)}
        counts = self.token_counts(text)
        over = [f"{name} {n} > {limits[name]}" for name, n in counts.items() if n > limits[name]]
        if over:
            raise ValueError(f"SafeRoPE toy: the prompt {text!r} is too long for the toy's text encoders "
                             f"({'; '.join(over)} tokens, end tokens included) — diffusers would cut it silently. "
                             "Use a short prompt in the toy world's words, e.g. 'a simple drawing of a red circle'.")
        unknown = self.unknown_words(text)
        if unknown:
            logger.warning("SafeRoPE toy: words the toy model does not know (spelled letter by letter): %s",
                           ", ".join(unknown))
        with torch.no_grad():
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(text, prompt_2=None, device=torch.device("cpu"),
                                                               num_images_per_prompt=1,
                                                               max_sequence_length=self.toy.max_sequence_length)
        return [[prompt_embeds.float().cpu(), {"pooled_output": pooled.float().cpu(), "guidance": float(guidance)}]]


class ToyVAE:
    """The toy's ``AutoencoderKL``; decodes as FluxPipeline does after unpacking its latents."""

    def __init__(self, toy: ToyFolder) -> None:
        require_diffusers()
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        self.toy = toy
        with torch.inference_mode(False):
            self.vae = AutoencoderKL.from_pretrained(str(toy.path / "vae"), local_files_only=True,
                                                     low_cpu_mem_usage=False).float().eval()
        self.processor = VaeImageProcessor(vae_scale_factor=toy.vae_scale_factor * FLUX_PACK)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` VAE-space latents (what ComfyUI's sampler returns) → IMAGE ``(B, H, W, 3)`` in 0..1."""
        if latent.ndim != 4 or latent.shape[1] != self.toy.latent_channels:
            raise ValueError(f"SafeRoPE toy VAE Decode: expected a latent (B, {self.toy.latent_channels}, h, w) of the "
                             f"toy model, got {tuple(latent.shape)}; connect a sampler that ran the toy model")
        with torch.no_grad():
            image = self.vae.decode(latent.to(torch.float32).cpu(), return_dict=False)[0]
            image = self.processor.postprocess(image, output_type="pt")  # (B, 3, H, W), (x / 2 + 0.5).clamp(0, 1)
        return image.permute(0, 2, 3, 1).contiguous().float()


# -- the nodes -----------------------------------------------------------------------------------------------

def _shipped_or_none() -> ToyFolder | None:
    """The shipped toy folder for widget defaults and tooltips, or None (the nodes then fail when run)."""
    try:
        return ToyFolder.read()
    except ToyModelError as e:
        logger.warning("SafeRoPE toy nodes: %s", e)
        return None


class SafeRoPEToyLoader:
    """Loads the shipped toy FLUX model into ComfyUI's own FLUX model class."""

    DESCRIPTION = ("Loads the pack's tiny toy FLUX model (small images of coloured shapes; runs on a CPU in seconds) into "
                   "ComfyUI's own FLUX model, plus its text encoders and VAE. For trying SafeRoPE without FLUX "
                   "weights: its adapter erases 'red' (python -m trainer demo --comfyui PATH).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", TEXT_TYPE, VAE_TYPE)
    RETURN_NAMES = ("model", "text_encoders", "vae")
    OUTPUT_TOOLTIPS = ("The toy transformer as a ComfyUI FLUX model: connect it to 'Apply SafeRoPE to Model' and "
                       "KSampler (cfg 1, the toy's guidance is set in 'Toy Text Encode').",
                       "The toy's CLIP and T5 text encoders, for 'Toy Text Encode'.",
                       "The toy's VAE, for 'Toy VAE Decode'.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls) -> str:
        return fingerprint()

    def load(self) -> tuple[Any, ToyTextEncoders, ToyVAE]:
        require_diffusers()
        toy = ToyFolder.read()
        return load_comfy_model(toy), ToyTextEncoders(toy), ToyVAE(toy)


class SafeRoPEToyTextEncode:
    """A toy prompt → CONDITIONING (T5 sequence + CLIP pooled + guidance), as diffusers' FluxPipeline encodes it."""

    DESCRIPTION = ("Encodes a prompt with the toy model's text encoders, exactly as diffusers' FluxPipeline does "
                   "(T5 tokens padded to the toy's length, CLIP pooled output), with the distilled guidance.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt's conditioning for KSampler (positive) and the LRS Visualizer.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        toy = _shipped_or_none()
        limit = f"at most {toy.max_sequence_length} tokens" if toy else "the toy's token limit"
        return {"required": {
            "text_encoders": (TEXT_TYPE, {"tooltip": "The text encoders from 'Load Toy Model (SafeRoPE toy)'."}),
            "text": ("STRING", {"multiline": True, "default": "a simple drawing of a red circle",
                                "tooltip": "A short prompt in the toy world's words: a shape (circle, square, triangle, "
                                           "cross) in a colour (red, green, blue, yellow, purple, grey), or an object "
                                           "such as 'a tomato'; " + limit + " (longer prompts are refused)."}),
            "guidance": ("FLOAT", {"default": toy.guidance if toy else _GUIDANCE_FALLBACK, "min": 0.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "Distilled guidance (FLUX.1-dev style; the toy's recipe uses this "
                                              "default). Use KSampler with cfg 1."}),
        }}

    def encode(self, text_encoders: ToyTextEncoders, text: str, guidance: float) -> tuple[list]:
        if not isinstance(text_encoders, ToyTextEncoders):
            raise TypeError("SafeRoPE toy Text Encode: 'text_encoders' must come from 'Load Toy Model (SafeRoPE toy)', "
                            f"got {type(text_encoders).__name__}")
        return (text_encoders.encode(text, guidance),)


class SafeRoPEToyVAEDecode:
    """A toy latent → IMAGE with the toy VAE."""

    DESCRIPTION = "Decodes a latent of the toy model to an image with the toy's VAE."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images (B, H, W, 3), values 0..1.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Latents from a KSampler that ran the toy model."}),
            "vae": (VAE_TYPE, {"tooltip": "The VAE from 'Load Toy Model (SafeRoPE toy)'."}),
        }}

    def decode(self, samples: dict, vae: ToyVAE) -> tuple[torch.Tensor]:
        if not isinstance(vae, ToyVAE):
            raise TypeError(f"SafeRoPE toy VAE Decode: 'vae' must come from 'Load Toy Model (SafeRoPE toy)', got "
                            f"{type(vae).__name__}")
        if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
            raise TypeError("SafeRoPE toy VAE Decode: 'samples' must be a LATENT")
        return (vae.decode(samples["samples"]),)


class SafeRoPEToyEmptyLatent:
    """An empty latent batch of the toy's shape (its VAE's channels at its image size)."""

    DESCRIPTION = "An empty latent batch for the toy model: its VAE's channels at the toy's image size."
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros of the toy's latent shape; KSampler adds the seed's noise.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "Number of images. ComfyUI draws the whole batch's noise from the "
                                              "sampler's one seed."}),
        }}

    def generate(self, batch_size: int) -> tuple[dict]:
        if int(batch_size) < 1:
            raise ValueError(f"SafeRoPE toy Empty Latent: batch_size must be ≥ 1, got {batch_size}")
        toy = ToyFolder.read()
        try:
            import comfy.model_management  # type: ignore[import-not-found]

            device = comfy.model_management.intermediate_device()
        except ImportError:
            device = torch.device("cpu")
        latent = torch.zeros(toy.latent_shape(int(batch_size)), dtype=torch.float32, device=device)
        return ({"samples": latent, "downscale_ratio_spacial": toy.vae_scale_factor},)


NODE_CLASS_MAPPINGS = {
    "SafeRoPEToyLoader": SafeRoPEToyLoader,
    "SafeRoPEToyTextEncode": SafeRoPEToyTextEncode,
    "SafeRoPEToyVAEDecode": SafeRoPEToyVAEDecode,
    "SafeRoPEToyEmptyLatent": SafeRoPEToyEmptyLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SafeRoPEToyLoader": "Load Toy Model (SafeRoPE toy)",
    "SafeRoPEToyTextEncode": "Toy Text Encode (SafeRoPE toy)",
    "SafeRoPEToyVAEDecode": "Toy VAE Decode (SafeRoPE toy)",
    "SafeRoPEToyEmptyLatent": "Empty Toy Latent (SafeRoPE toy)",
}

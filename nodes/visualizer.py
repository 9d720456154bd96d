"""Node "LRS Visualizer" (``SafeRoPELRSVisualizer``): why a prompt is (or is not) flagged.

It runs the protected model once — ComfyUI's own sampler machinery, one Euler step from the
chosen noise level on an empty latent, cfg 1 so only the given conditioning is evaluated — with
a :class:`~.risk.RiskCollector` listening at every hook site, then draws the scores
(:mod:`.lrs_plot`) and summarises them (:mod:`.summary`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .install import layers_of
from .lrs_plot import PlotInput, render, to_image_tensor
from .patch import collect_risk
from .risk import RiskCollector, RiskReport
from .summary import Setting, summarize
from .tokens import token_labels

logger = logging.getLogger(__name__)

_MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


def evaluation_inputs() -> dict:
    """The required inputs of one risk evaluation (LRS Visualizer and Risk Check)."""
    return {
        "model": ("MODEL", {"tooltip": "A model that went through 'Apply SafeRoPE to Model' (one or more): "
                                       "FLUX.1, Flux.2, Chroma, HunyuanImage 2.1, Qwen-Image or Z-Image."}),
        "conditioning": ("CONDITIONING", {"tooltip": "The prompt's conditioning (e.g. from CLIP Text Encode "
                                                     "/ FluxGuidance), as given to the sampler."}),
        "width": ("INT", {"default": 1024, "min": 16, "max": _MAX_RESOLUTION, "step": 16,
                          "tooltip": "Width of the empty latent the model is evaluated on (pixels)."}),
        "height": ("INT", {"default": 1024, "min": 16, "max": _MAX_RESOLUTION, "step": 16,
                           "tooltip": "Height of the empty latent the model is evaluated on (pixels)."}),
        "noise_level": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                  "tooltip": "Where in sampling to look, like start_percent: 0 = first step "
                                             "(pure noise), 0.9 = late (little noise)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                         "tooltip": "Seed of the noise added to the empty latent."}),
    }


@dataclass
class RiskEvaluation:
    """One model evaluation's risk: the report, the layers it came from, where it ran."""

    report: RiskReport
    layers: list
    sigma: float
    latent: torch.Tensor


def evaluate_risk(model: Any, conditioning: list, width: int, height: int, noise_level: float, seed: int, *,
                  who: str) -> RiskEvaluation:
    """Run the protected model once — ComfyUI's sampler, one Euler step from ``noise_level`` on an empty
    latent, cfg 1 — with a :class:`~.risk.RiskCollector` at every hook site (the LRS Visualizer and the
    Risk Check share it). ``who`` names the node in error messages."""
    import comfy.sample  # type: ignore[import-not-found]
    import comfy.samplers  # type: ignore[import-not-found]

    layers = layers_of(model)
    if not layers:
        raise ValueError(f"{who}: this MODEL has no SafeRoPE applied; connect the output of 'Apply SafeRoPE to Model'")
    if not conditioning:
        raise ValueError(f"{who}: the conditioning is empty")
    if not 0.0 <= noise_level < 1.0:
        raise ValueError(f"{who}: noise_level must be in [0, 1), got {noise_level}")
    lf = model.get_model_object("latent_format")
    down = int(getattr(lf, "spacial_downscale_ratio", 8))  # FLUX's VAE: 8 (attribute absent before 0.4)
    latent = torch.zeros(1, lf.latent_channels, max(1, height // down), max(1, width // down))  # (1, C, h, w)
    if getattr(lf, "latent_dimensions", 2) == 3:  # e.g. Qwen-Image (Wan 2.1 latents): (1, C, 1, h, w), as KSampler makes it
        latent = latent.unsqueeze(2)
    noise = comfy.sample.prepare_noise(latent, seed)
    ms = model.get_model_object("model_sampling")
    sigma = min(float(ms.percent_to_sigma(noise_level)), float(ms.sigma_max))
    collector = RiskCollector()
    with collect_risk(collector):
        comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"),
                                   torch.tensor([sigma, 0.0]), conditioning, conditioning, latent,
                                   disable_pbar=True, seed=seed)
    return RiskEvaluation(collector.report(layers), layers, sigma, latent)


class SafeRoPELRSVisualizer:
    """Per-token Latent Risk Scores across the patched blocks, and where image tokens were gated."""

    DESCRIPTION = ("Shows why a prompt is flagged: runs the SafeRoPE-protected model once at a chosen noise level "
                   "and draws the risk of every text token in every patched block, and where image tokens were gated.")
    CATEGORY = "SafeRoPE"
    FUNCTION = "visualize"
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT", "BOOLEAN")
    RETURN_NAMES = ("image", "summary", "max_risk", "flagged")
    OUTPUT_TOOLTIPS = ("Heatmap of text-token risk per block (threshold marked, gated tokens outlined) and the "
                       "map of gated image tokens.",
                       "Text summary: max risk, top tokens, gated share per block.",
                       "Highest Latent Risk Score of any token, head and patched block (0..1).",
                       "True when some token passed an adapter's threshold: the prompt carries the concept.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": evaluation_inputs(),
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: the CLIP that encoded the prompt, to label tokens with words."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Optional: the prompt text given to CLIP Text Encode (needed with "
                                                 "'clip' for word labels)."}),
            },
        }

    def visualize(self, model: Any, conditioning: list, width: int, height: int, noise_level: float, seed: int,
                  clip: Any = None, prompt: str = "") -> tuple[torch.Tensor, str, float, bool]:
        import comfy.utils  # type: ignore[import-not-found]

        pbar = comfy.utils.ProgressBar(3)
        ev = evaluate_risk(model, conditioning, width, height, noise_level, seed, who="LRS Visualizer")
        pbar.update(1)
        report, layers = ev.report, ev.layers
        txt_len = report.txt_len if report.columns else int(conditioning[0][0].shape[1])
        labels, note = token_labels(clip, prompt or "", txt_len)
        labels = labels or [""] * txt_len
        pbar.update(1)
        summary = summarize(report, layers, labels, Setting(noise_level, ev.sigma, width, height, note))
        taus = sorted({round(layer.tau, 3) for layer in layers})
        plot = PlotInput(
            title="SafeRoPE latent risk: " + ", ".join(layer.name for layer in layers),
            subtitle=(f"noise level {noise_level:.2f} (sigma {ev.sigma:.3g}), {width}x{height}, {report.txt_len} text / "
                      f"{report.img_len} image tokens, threshold {', '.join(map(str, taus))}"),
            labels=labels, grid=self._grid(model, ev.latent), threshold=layers[0].tau)
        image = to_image_tensor(render(report, plot))
        pbar.update(1)
        logger.info("SafeRoPE LRS:\n%s", summary)
        return image, summary, report.max_risk(), report.flagged()

    @staticmethod
    def _grid(model: Any, latent: torch.Tensor) -> tuple[int, int]:
        """Token grid of the main image: latent size over the model's patch size (ComfyUI's rounding)."""
        p = getattr(model.get_model_object("diffusion_model"), "patch_size", 2)
        p = int(p[-1] if isinstance(p, (list, tuple)) else p)  # HunyuanImage: (t, h, w) patch sizes
        h, w = latent.shape[-2:]
        return (h + p // 2) // p, (w + p // 2) // p

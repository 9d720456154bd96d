"""Node "SafeRoPE Risk Check" (``SafeRoPERiskCheck``): is this prompt risky? — as values a workflow can branch on.

It runs the same one model evaluation as the LRS Visualizer (:func:`.visualizer.evaluate_risk`)
without drawing, and returns the highest Latent Risk Score and whether some token passed an
adapter's threshold, e.g. for ComfyUI's Switch node (route a flagged prompt's image to a
placeholder, or keep it out of the saved outputs).
"""

from __future__ import annotations

import logging
from typing import Any

from .summary import Setting, summarize
from .visualizer import evaluate_risk, evaluation_inputs

logger = logging.getLogger(__name__)


class SafeRoPERiskCheck:
    """Max risk and a flag for one prompt, from one evaluation of the protected model."""

    DESCRIPTION = ("Checks a prompt against the SafeRoPE adapters of a model: one model evaluation, no image. "
                   "Outputs the highest Latent Risk Score and whether the prompt passed an adapter's threshold, "
                   "so a workflow can branch on it.")
    CATEGORY = "SafeRoPE"
    FUNCTION = "check"
    RETURN_TYPES = ("FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("max_risk", "flagged", "summary")
    OUTPUT_TOOLTIPS = ("Highest Latent Risk Score of any token, head and patched block (0..1).",
                       "True when some token passed an adapter's threshold: the prompt carries the concept.",
                       "Text summary: max risk, top tokens, gated share per block.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": evaluation_inputs()}

    def check(self, model: Any, conditioning: list, width: int, height: int, noise_level: float,
              seed: int) -> tuple[float, bool, str]:
        ev = evaluate_risk(model, conditioning, width, height, noise_level, seed, who="SafeRoPE Risk Check")
        report = ev.report
        summary = summarize(report, ev.layers, [""] * report.txt_len,
                            Setting(noise_level, ev.sigma, width, height, "no token labels (Risk Check)"))
        logger.info("SafeRoPE risk check: max risk %.3f, flagged %s", report.max_risk(), report.flagged())
        return report.max_risk(), report.flagged(), summary

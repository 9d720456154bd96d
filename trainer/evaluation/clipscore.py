"""CLIP score of generated images against their prompts (``evaluate --clip DIR``).

``score = 100 · max(cos(E_image(x), E_text(prompt)), 0)`` with a local ``transformers``
``CLIPModel`` and its processor (tokenizer + image processor) loaded with
``local_files_only=True`` — the convention of torchmetrics' ``CLIPScore``. Prompts longer than
the text encoder's limit (77 tokens for OpenAI's CLIPs) are truncated. Nothing is downloaded:
pass a folder written by ``save_pretrained`` (e.g. a snapshot of openai/clip-vit-large-patch14).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import UsageError

logger = logging.getLogger(__name__)


class ClipScorer:
    """CLIP score per image (``score``, in [0, 100]) and its mean per set."""

    name = "clip"

    def __init__(self, folder: str, *, device: str = "cpu", batch_size: int = 16) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from ..families.models import quiet_diffusers

        quiet_diffusers()  # no loading bars or advisory chatter from transformers
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UsageError(f"--clip {folder!r}: no such folder (a local CLIP model folder, e.g. from save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--clip {folder!r}: not a CLIP model folder with its processor ({first})") from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.folder = str(path)
        self.batch_size = batch_size
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        self.max_length = int(max_len)

    def cosines(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        """Cosine similarity of each image's and its prompt's CLIP embeddings."""
        import torch
        import torch.nn.functional as F

        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            ims = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            texts = list(prompts[start:start + self.batch_size])
            text_in = self.processor.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                               return_tensors="pt")
            pixels = self.processor.image_processor(images=ims, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                img = self.model.get_image_features(pixel_values=pixels.to(self.device))
                txt = self.model.get_text_features(input_ids=text_in["input_ids"].to(self.device),
                                                   attention_mask=text_in["attention_mask"].to(self.device))
            cos = F.cosine_similarity(_features(img).float(), _features(txt).float(), dim=-1)
            out += [float(c) for c in cos.cpu()]
        return out

    def score_images(self, images: Sequence[Any], prompts: Sequence[str],
                     labels: Sequence[Mapping[str, str]]) -> list[dict[str, float]]:
        return [{"score": 100.0 * max(c, 0.0)} for c in self.cosines(images, prompts)]

    @staticmethod
    def summarize(values: Sequence[Mapping[str, float]]) -> dict[str, float]:
        return {"score": sum(v["score"] for v in values) / len(values)} if values else {}

    def score(self, images: Sequence[Any], prompts: Sequence[str],
              labels: Sequence[Mapping[str, str]]) -> dict[str, float]:
        return self.summarize(self.score_images(images, prompts, labels))

    def describe(self) -> dict[str, Any]:
        return {"model": self.folder, "score": "100 * max(cos(image embedding, prompt embedding), 0)",
                "max_prompt_tokens": self.max_length}


def _features(x: Any) -> Any:
    """The embedding tensor (newer transformers may return a model output instead of a tensor)."""
    if hasattr(x, "pooler_output") and not hasattr(x, "shape"):
        return x.pooler_output
    return x
